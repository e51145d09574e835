package vmdk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/flate"

	"github.com/vmdk2kvm/vmdk2kvm/internal/adler32"
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
	if n, rest, ok := storedOnly(out, z[2:]); ok {
		return n, checkTrailer(out[:n], rest)
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
	return n, checkTrailer(out[:n], z[len(z)-in.br.Len():])
}

// checkTrailer checks the Adler-32 trailer at the start of rest against
// the decompressed bytes.
func checkTrailer(out, rest []byte) error {
	if len(rest) < 4 {
		return errors.New("zlib stream has no Adler-32 trailer")
	}
	if want, got := binary.BigEndian.Uint32(rest), adler32.Checksum(out); want != got {
		return fmt.Errorf("Adler-32 checksum %#08x, the stream says %#08x", got, want)
	}
	return nil
}

// storedOnly decodes a deflate stream made only of stored blocks (what
// zlib writes for incompressible data: most grains of a real disk) with
// one copy, instead of two through the inflater's window. It returns the
// length and the bytes after the stream; ok is false for anything else
// (a compressed block, a malformed one), which the inflater then handles
// (and reports) from the start.
func storedOnly(out, d []byte) (n int, rest []byte, ok bool) {
	for {
		if len(d) < 5 || d[0]>>1 != 0 { // BTYPE 00 and zero padding bits
			return 0, nil, false
		}
		final := d[0]&1 != 0
		l := int(binary.LittleEndian.Uint16(d[1:]))
		if binary.LittleEndian.Uint16(d[3:]) != ^uint16(l) || 5+l > len(d) || n+l > len(out) {
			return 0, nil, false
		}
		n += copy(out[n:], d[5:5+l])
		d = d[5+l:]
		if final {
			return n, d, true
		}
	}
}
