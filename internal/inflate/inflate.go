// Package inflate decodes raw deflate streams (RFC 1951) that are held
// whole in memory into a caller's flat output buffer.
//
// Because the output buffer holds everything decoded so far, matches copy
// straight out of it: there is no 32 KiB sliding window and no copy out of
// one, unlike a streaming io.Reader decoder. Huffman codes decode through
// tables whose entries carry the symbol's base value and extra-bit count,
// so a literal, a length or a distance costs one lookup (two for codes
// longer than the primary table). A Decoder keeps its tables between
// calls and allocates nothing; callers pool it.
//
// The package knows nothing of zlib or gzip framing: Decode returns the
// input that follows the deflate stream, where a zlib trailer would be.
package inflate

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

var (
	// ErrOutputFull reports a stream that decodes to more bytes than the
	// output buffer holds.
	ErrOutputFull = errors.New("deflate stream decodes to more bytes than the output buffer holds")
	// ErrTruncated reports a stream that ends before its final block does.
	ErrTruncated = fmt.Errorf("deflate stream is truncated: %w", io.ErrUnexpectedEOF)
)

// CorruptError reports a malformed stream: Offset is the input byte being
// decoded when the problem showed.
type CorruptError struct {
	Offset int
	Reason string
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("corrupt deflate stream at input byte %d: %s", e.Offset, e.Reason)
}

// Decoder decodes deflate streams. The zero value is ready to use; a
// Decoder is not safe for concurrent use (give each goroutine its own, or
// pool them).
type Decoder struct {
	lit   [litTableSize]uint32
	dist  [distTableSize]uint32
	pre   [1 << preBits]uint32
	lens  [maxLit + maxDist]uint8
	fixed bool // lit and dist hold the fixed code of block type 1
}

// bitReader reads the input LSB first through a 64-bit buffer. pos counts
// the bytes loaded into buf, including zero bytes loaded past the end of
// the input (never more than 8): the bits consumed are pos*8-n, and the
// stream is truncated when that exceeds the input.
type bitReader struct {
	in  []byte
	pos int
	buf uint64
	n   uint // valid bits in buf; buf may hold further real input above them
}

// refill tops the buffer up to at least 56 bits.
func (b *bitReader) refill() {
	if b.pos+8 <= len(b.in) {
		b.buf |= binary.LittleEndian.Uint64(b.in[b.pos:]) << (b.n & 63)
		b.pos += int(63-b.n) >> 3
		b.n |= 56
		return
	}
	for b.n < 56 {
		if b.pos < len(b.in) {
			b.buf |= uint64(b.in[b.pos]) << (b.n & 63)
		}
		b.pos++
		b.n += 8
	}
}

// bits consumes and returns k (≤ 32) bits; the buffer must hold them.
func (b *bitReader) bits(k uint) uint32 {
	v := uint32(b.buf & (1<<k - 1))
	b.buf >>= k & 63
	b.n -= k
	return v
}

// overrun reports whether bits past the end of the input were consumed.
func (b *bitReader) overrun() bool { return b.pos*8-int(b.n) > len(b.in)*8 }

// offset is the input byte holding the next unconsumed bit.
func (b *bitReader) offset() int { return (b.pos*8 - int(b.n)) / 8 }

func (b *bitReader) corrupt(format string, args ...any) error {
	return &CorruptError{Offset: b.offset(), Reason: fmt.Sprintf(format, args...)}
}

// Decode decodes the deflate stream at the start of in into out and
// returns the number of bytes decoded and the input that follows the
// stream (from the byte after the one holding its last bit).
//
// A stream that decodes to more than len(out) bytes fails with
// ErrOutputFull, one that ends early with ErrTruncated, any other
// malformation with a *CorruptError. Decode writes nothing outside out,
// but it may write scratch bytes into out beyond the n it returns.
func (d *Decoder) Decode(out, in []byte) (n int, rest []byte, err error) {
	b := bitReader{in: in}
	op := 0
	for {
		b.refill()
		if b.overrun() {
			return op, nil, ErrTruncated
		}
		hdr := b.bits(3)
		final := hdr&1 != 0
		switch hdr >> 1 {
		case 0:
			if op, err = d.stored(out, op, &b); err != nil {
				return op, nil, err
			}
		case 1:
			if !d.fixed {
				d.buildFixed()
			}
			if op, err = d.huffman(out, op, &b); err != nil {
				return op, nil, err
			}
		case 2:
			if err := d.readDynamic(&b); err != nil {
				return op, nil, err
			}
			if op, err = d.huffman(out, op, &b); err != nil {
				return op, nil, err
			}
		default:
			return op, nil, b.corrupt("block type 3 is reserved")
		}
		if final {
			break
		}
	}
	b.bits(b.n & 7) // padding to the byte boundary
	if b.overrun() {
		return op, nil, ErrTruncated
	}
	return op, in[b.pos-int(b.n/8):], nil
}

// stored copies a stored block (RFC 1951 3.2.4).
func (d *Decoder) stored(out []byte, op int, b *bitReader) (int, error) {
	b.bits(b.n & 7)
	if b.overrun() {
		return op, ErrTruncated
	}
	// Give the whole bytes left in the buffer back to the input.
	p := b.pos - int(b.n/8)
	b.pos, b.buf, b.n = p, 0, 0
	if len(b.in)-p < 4 {
		return op, ErrTruncated
	}
	l := int(binary.LittleEndian.Uint16(b.in[p:]))
	if nl := binary.LittleEndian.Uint16(b.in[p+2:]); uint16(l) != ^nl {
		return op, b.corrupt("stored block LEN %#04x and NLEN %#04x are not complements", l, nl)
	}
	p += 4
	if len(b.in)-p < l {
		return op, ErrTruncated
	}
	if len(out)-op < l {
		return op, ErrOutputFull
	}
	copy(out[op:op+l], b.in[p:p+l])
	b.pos = p + l
	return op + l, nil
}

// precodeOrder is the order in which a dynamic block header lists the code
// lengths of the code-length alphabet (RFC 1951 3.2.7).
var precodeOrder = [19]uint8{16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15}

// readDynamic reads a dynamic block's header and builds its tables.
func (d *Decoder) readDynamic(b *bitReader) error {
	d.fixed = false
	b.refill()
	nlit := int(b.bits(5)) + 257
	ndist := int(b.bits(5)) + 1
	npre := int(b.bits(4)) + 4
	if nlit > maxLit-2 {
		return b.corrupt("HLIT says %d literal/length codes, more than 286", nlit)
	}
	if ndist > maxDist-2 {
		return b.corrupt("HDIST says %d distance codes, more than 30", ndist)
	}
	var plens [19]uint8
	for i := range npre {
		if b.n < 3 {
			b.refill()
		}
		plens[precodeOrder[i]] = uint8(b.bits(3))
	}
	if err := build(d.pre[:], preBits, plens[:], kindPre); err != nil {
		return b.corrupt("code-length code: %v", err)
	}
	lens := d.lens[:nlit+ndist]
	for i := 0; i < len(lens); {
		if b.n < 14 {
			b.refill()
			if b.overrun() {
				return ErrTruncated
			}
		}
		e := d.pre[b.buf&(1<<preBits-1)]
		if e&fInvalid != 0 {
			return b.corrupt("invalid code-length code")
		}
		b.bits(uint(e & lenMask))
		sym := uint8(e >> 16)
		if sym < 16 {
			lens[i] = sym
			i++
			continue
		}
		var rep int
		var v uint8
		switch sym {
		case 16:
			if i == 0 {
				return b.corrupt("code length repeat with no previous length")
			}
			rep, v = 3+int(b.bits(2)), lens[i-1]
		case 17:
			rep = 3 + int(b.bits(3))
		default:
			rep = 11 + int(b.bits(7))
		}
		if rep > len(lens)-i {
			return b.corrupt("code length repeat runs past the %d lengths", len(lens))
		}
		for k := range rep {
			lens[i+k] = v
		}
		i += rep
	}
	if b.overrun() {
		return ErrTruncated
	}
	if lens[256] == 0 {
		return b.corrupt("literal/length code has no end-of-block code")
	}
	if err := build(d.lit[:], litBits, lens[:nlit], kindLit); err != nil {
		return b.corrupt("literal/length code: %v", err)
	}
	if err := build(d.dist[:], distBits, lens[nlit:], kindDist); err != nil {
		return b.corrupt("distance code: %v", err)
	}
	return nil
}

// buildFixed builds the tables of the fixed code (RFC 1951 3.2.6).
func (d *Decoder) buildFixed() {
	var l [maxLit]uint8
	for i := range l {
		switch {
		case i < 144:
			l[i] = 8
		case i < 256:
			l[i] = 9
		case i < 280:
			l[i] = 7
		default:
			l[i] = 8
		}
	}
	var dl [maxDist]uint8
	for i := range dl {
		dl[i] = 5
	}
	if build(d.lit[:], litBits, l[:], kindLit) != nil || build(d.dist[:], distBits, dl[:], kindDist) != nil {
		panic("inflate: fixed code does not build")
	}
	d.fixed = true
}
