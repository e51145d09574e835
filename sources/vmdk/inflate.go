package vmdk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
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
	if want, got := binary.BigEndian.Uint32(rest), adler32Sum(out); want != got {
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

// adler32Sum is RFC 1950's Adler-32, 8 bytes per step instead of one (about
// twice hash/adler32's speed; the checksum is a fifth of the CPU time of
// reading a streamOptimized disk). For a word of bytes b0..b7:
// s2 += 8·s1 + Σ(8-j)·bj and s1 += Σbj, the same sums as byte by byte, so
// the classic 5552-byte bound keeps them within 32 bits. The byte sums
// come from 16-bit lanes (even and odd bytes) and one multiplication each:
// the top lane of lanes×constant is the weighted sum of the lanes, and no
// lane overflows (at most 255·20 = 5100 before the final add).
func adler32Sum(p []byte) uint32 {
	const (
		mod, nmax = 65521, 5552
		lanes     = 0x00ff00ff00ff00ff
		ones      = 0x0001000100010001
		wEven     = 2 | 4<<16 | 6<<32 | 8<<48 // weights 8,6,4,2 of b0,b2,b4,b6
		wOdd      = 1 | 3<<16 | 5<<32 | 7<<48 // weights 7,5,3,1 of b1,b3,b5,b7
	)
	s1, s2 := uint32(1), uint32(0)
	for len(p) > 0 {
		q := p[:min(len(p), nmax)]
		p = p[len(q):]
		for len(q) >= 16 {
			a := binary.LittleEndian.Uint64(q)
			b := binary.LittleEndian.Uint64(q[8:])
			ae, ao := a&lanes, (a>>8)&lanes
			be, bo := b&lanes, (b>>8)&lanes
			sa := uint32(((ae + ao) * ones) >> 48)
			sb := uint32(((be + bo) * ones) >> 48)
			wa := uint32((ae*wEven + ao*wOdd) >> 48)
			wb := uint32((be*wEven + bo*wOdd) >> 48)
			s2 += 16*s1 + 8*sa + wa + wb
			s1 += sa + sb
			q = q[16:]
		}
		for _, x := range q {
			s1 += uint32(x)
			s2 += s1
		}
		s1 %= mod
		s2 %= mod
	}
	return s2<<16 | s1
}
