package vmdk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/adler32"
	"io"

	"github.com/klauspost/compress/flate"
)

// inflater decompresses zlib streams (RFC 1950) with a reusable deflate
// reader over the compressed bytes (klauspost's fast path for a
// bytes.Reader). It checks the zlib header and the Adler-32 trailer itself:
// a stored (incompressible) block has no other integrity check.
type inflater struct {
	br bytes.Reader
	fr io.ReadCloser
}

// inflate decompresses the zlib stream z into out, which it must fit, and
// returns the decompressed length.
func (in *inflater) inflate(out, z []byte) (int, error) {
	if len(z) < 6 {
		return 0, errors.New("zlib stream too short")
	}
	cmf, flg := z[0], z[1]
	if cmf&0x0f != 8 || cmf>>4 > 7 || (uint16(cmf)<<8|uint16(flg))%31 != 0 {
		return 0, fmt.Errorf("bad zlib header %#02x %#02x", cmf, flg)
	}
	if flg&0x20 != 0 {
		return 0, errors.New("zlib stream wants a preset dictionary")
	}
	in.br.Reset(z[2:])
	if in.fr == nil {
		in.fr = flate.NewReader(&in.br)
	} else if err := in.fr.(flate.Resetter).Reset(&in.br, nil); err != nil {
		return 0, err
	}
	n, err := io.ReadFull(in.fr, out)
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF):
		// Shorter than out: the caller decides whether that is allowed.
	case err != nil:
		return n, fmt.Errorf("inflate: %w", err)
	default:
		var one [1]byte
		if m, err := in.fr.Read(one[:]); m > 0 {
			return n, fmt.Errorf("inflates to more than %d bytes", len(out))
		} else if err != nil && err != io.EOF {
			return n, fmt.Errorf("inflate: %w", err)
		}
	}
	rest := z[len(z)-in.br.Len():]
	if len(rest) < 4 {
		return n, errors.New("zlib stream has no Adler-32 trailer")
	}
	if want, got := binary.BigEndian.Uint32(rest), adler32.Checksum(out[:n]); want != got {
		return n, fmt.Errorf("Adler-32 checksum %#08x, the stream says %#08x", got, want)
	}
	return n, nil
}
