package block

import (
	"context"
	"fmt"
	"io"
)

// ClipRange clips [off, off+length) to [0, size). It returns the clipped
// offset and length; length is 0 when nothing remains.
func ClipRange(size, off, length int64) (int64, int64) {
	if off < 0 {
		length += off
		off = 0
	}
	if off >= size || length <= 0 {
		return off, 0
	}
	if length > size-off {
		length = size - off
	}
	return off, length
}

// Whole returns one extent of type t covering [off, off+length) clipped to
// size: the answer of a device that knows nothing finer (Whole(..., Data)).
func Whole(size, off, length int64, t ExtentType) []Extent {
	off, length = ClipRange(size, off, length)
	if length == 0 {
		return nil
	}
	return []Extent{{Off: off, Len: length, Type: t}}
}

// Clip returns the parts of sorted extents that fall in [off, off+length).
func Clip(exts []Extent, off, length int64) []Extent {
	end := off + length
	out := make([]Extent, 0, len(exts))
	for _, e := range exts {
		s, t := max(e.Off, off), min(e.End(), end)
		if s < t {
			out = append(out, Extent{Off: s, Len: t - s, Type: e.Type})
		}
	}
	return out
}

// Append adds e to a sorted list, coalescing it with the last extent when they
// touch and have the same type. Empty extents are dropped.
func Append(exts []Extent, e Extent) []Extent {
	if e.Len <= 0 {
		return exts
	}
	if n := len(exts); n > 0 && exts[n-1].Type == e.Type && exts[n-1].End() == e.Off {
		exts[n-1].Len += e.Len
		return exts
	}
	return append(exts, e)
}

// Merge coalesces adjacent extents of the same type, in place.
func Merge(exts []Extent) []Extent {
	out := exts[:0]
	for _, e := range exts {
		out = Append(out, e)
	}
	return out
}

// Check verifies that exts cover [off, off+length) exactly: sorted,
// contiguous, non-empty. Devices and tests use it to hold extent lists honest.
func Check(exts []Extent, off, length int64) error {
	pos := off
	for i, e := range exts {
		if e.Off != pos {
			return fmt.Errorf("extent %d starts at %d, want %d", i, e.Off, pos)
		}
		if e.Len <= 0 {
			return fmt.Errorf("extent %d at %d has length %d", i, e.Off, e.Len)
		}
		pos = e.End()
	}
	if pos != off+length {
		return fmt.Errorf("extents end at %d, want %d", pos, off+length)
	}
	return nil
}

// Sum returns the total length of the extents of the given types.
func Sum(exts []Extent, types ...ExtentType) int64 {
	var n int64
	for _, e := range exts {
		for _, t := range types {
			if e.Type == t {
				n += e.Len
				break
			}
		}
	}
	return n
}

// Resolve replaces every Hole of top (extents of an upper layer that has no
// data there) by what below reports for that range. It is how a chain, an
// overlay or a backing file computes exact extents: a hole only where no
// layer has anything. Zero extents of top mask the lower layer.
func Resolve(ctx context.Context, top []Extent, below func(ctx context.Context, off, length int64) ([]Extent, error)) ([]Extent, error) {
	out := make([]Extent, 0, len(top))
	for _, e := range top {
		if e.Type != Hole {
			out = Append(out, e)
			continue
		}
		sub, err := below(ctx, e.Off, e.Len)
		if err != nil {
			return nil, err
		}
		if err := Check(sub, e.Off, e.Len); err != nil {
			return nil, fmt.Errorf("lower layer extents for [%d,+%d): %w", e.Off, e.Len, err)
		}
		for _, s := range sub {
			out = Append(out, s)
		}
	}
	return out, nil
}

// Walk calls fn for the extents of [off, off+length) of d, asking the device
// for at most window bytes at a time so that a huge, fragmented disk never
// needs its whole map in memory.
func Walk(ctx context.Context, d Device, off, length, window int64, fn func(Extent) error) error {
	off, length = ClipRange(d.Size(), off, length)
	end := off + length
	if window <= 0 {
		window = 1 << 30
	}
	for pos := off; pos < end; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(window, end-pos)
		exts, err := d.Extents(ctx, pos, n)
		if err != nil {
			return fmt.Errorf("extents at offset %d: %w", pos, err)
		}
		if err := Check(exts, pos, n); err != nil {
			return fmt.Errorf("device returned bad extents at offset %d: %w", pos, err)
		}
		for _, e := range exts {
			if err := fn(e); err != nil {
				return err
			}
		}
		pos += n
	}
	return nil
}

// ReadZeros fills p with zeros and applies io.ReaderAt's end-of-device rule:
// it is what a device returns for a range it knows to be zero.
func ReadZeros(p []byte, off, size int64) (int, error) {
	if off >= size {
		return 0, io.EOF
	}
	n := len(p)
	if int64(n) > size-off {
		n = int(size - off)
	}
	clear(p[:n])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// ShortRead trims a read of len(p) at off to the device size. It returns the
// number of bytes to read and io.EOF when the read is cut short (or nil).
func ShortRead(p []byte, off, size int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	if int64(len(p)) > size-off {
		return int(size - off), io.EOF
	}
	return len(p), nil
}

// IsZero reports whether p holds only zero bytes.
func IsZero(p []byte) bool {
	for len(p) >= len(zeroPage) {
		if string(p[:len(zeroPage)]) != string(zeroPage[:]) {
			return false
		}
		p = p[len(zeroPage):]
	}
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

var zeroPage [4096]byte
