package vmdk

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vmdk2kvm/vmdk2kvm/internal/adler32"
	"github.com/vmdk2kvm/vmdk2kvm/internal/inflate"
)

// inflater decompresses zlib streams (RFC 1950) whole, straight into the
// grain buffer, with a reusable deflate decoder (its tables are kept
// between grains). It checks the zlib header and the Adler-32 trailer
// itself: a stored (incompressible) block has no other integrity check.
type inflater struct {
	d inflate.Decoder
}

// inflate decompresses the zlib stream z into out, which it must fit, and
// returns the decompressed length. Bytes of out past that length read as
// zeros.
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
	n, rest, err := in.d.Decode(out, z[2:])
	switch {
	case errors.Is(err, inflate.ErrOutputFull):
		return n, fmt.Errorf("inflates to more than %d bytes", len(out))
	case err != nil:
		return n, fmt.Errorf("inflate: %w", err)
	}
	// The decoder may leave scratch bytes past n; the caller decides
	// whether a short grain is allowed, and then it reads as zeros.
	clear(out[n:])
	return n, checkTrailer(out[:n], rest)
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
