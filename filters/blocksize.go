package filters

import (
	"fmt"
	"sync"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// BlockSize makes every request reaching the device below aligned to Min and
// at most Max bytes long. Unaligned reads read the covering aligned range;
// unaligned writes are read-modify-write, serialised so they do not race.
// Zero, Trim and Flush pass through (split to Max); the device's Size should
// be a multiple of Min, or the tail is read with a short request.
type BlockSize struct {
	block.Device
	w        block.Writable // nil when the device is read-only
	min, max int64
	rmw      sync.Mutex
}

// NewBlockSize wraps d. min and max must be powers of two with min ≤ max.
func NewBlockSize(d block.Device, minSize, maxSize int64) (*BlockSize, error) {
	if minSize <= 0 || minSize&(minSize-1) != 0 || maxSize < minSize || maxSize&(maxSize-1) != 0 {
		return nil, fmt.Errorf("blocksize: min %d and max %d must be powers of two with min <= max", minSize, maxSize)
	}
	b := &BlockSize{Device: d, min: minSize, max: maxSize}
	b.w, _ = d.(block.Writable)
	return b, nil
}

// ReadAt implements block.Device.
func (b *BlockSize) ReadAt(p []byte, off int64) (int, error) {
	n, eof := block.ShortRead(p, off, b.Size())
	if n == 0 {
		return 0, eof
	}
	s, e := off&^(b.min-1), off+int64(n)
	ae := min((e+b.min-1)&^(b.min-1), b.Size())
	if s == off && ae == e {
		if err := b.readAligned(p[:n], off); err != nil {
			return 0, err
		}
		return n, eof
	}
	buf := make([]byte, ae-s)
	if err := b.readAligned(buf, s); err != nil {
		return 0, err
	}
	copy(p[:n], buf[off-s:])
	return n, eof
}

// readAligned reads an aligned range in pieces of at most max bytes.
func (b *BlockSize) readAligned(p []byte, off int64) error {
	for done := int64(0); done < int64(len(p)); {
		n := min(b.max, int64(len(p))-done)
		if err := readFull(b.Device, p[done:done+n], off+done); err != nil {
			return fmt.Errorf("blocksize: read at %d (+%d): %w", off+done, n, err)
		}
		done += n
	}
	return nil
}

// WriteAt implements block.Writer when the device below is writable.
func (b *BlockSize) WriteAt(p []byte, off int64) (int, error) {
	if b.w == nil {
		return 0, fmt.Errorf("blocksize: device is read-only")
	}
	e := off + int64(len(p))
	if off%b.min == 0 && (e%b.min == 0 || e == b.Size()) {
		return len(p), b.writeAligned(p, off)
	}
	b.rmw.Lock()
	defer b.rmw.Unlock()
	s := off &^ (b.min - 1)
	ae := min((e+b.min-1)&^(b.min-1), b.Size())
	buf := make([]byte, ae-s)
	if err := b.readAligned(buf, s); err != nil {
		return 0, err
	}
	copy(buf[off-s:], p)
	return len(p), b.writeAligned(buf, s)
}

func (b *BlockSize) writeAligned(p []byte, off int64) error {
	for done := int64(0); done < int64(len(p)); {
		n := min(b.max, int64(len(p))-done)
		if _, err := b.w.WriteAt(p[done:done+n], off+done); err != nil {
			return fmt.Errorf("blocksize: write at %d (+%d): %w", off+done, n, err)
		}
		done += n
	}
	return nil
}

func (b *BlockSize) split(off, length int64, op func(off, length int64) error) error {
	if b.w == nil {
		return fmt.Errorf("blocksize: device is read-only")
	}
	for done := int64(0); done < length; {
		n := min(b.max, length-done)
		if err := op(off+done, n); err != nil {
			return err
		}
		done += n
	}
	return nil
}

// Zero implements block.Writer. Unaligned edges are written as zeros.
func (b *BlockSize) Zero(off, length int64) error {
	return b.edges(off, length, func(o, n int64) error { return b.w.Zero(o, n) })
}

// Trim implements block.Writable. Unaligned edges are written as zeros.
func (b *BlockSize) Trim(off, length int64) error {
	return b.edges(off, length, func(o, n int64) error { return b.w.Trim(o, n) })
}

// edges applies op to the aligned middle of a range and writes zeros over
// the unaligned head and tail (read-modify-write).
func (b *BlockSize) edges(off, length int64, op func(off, length int64) error) error {
	if b.w == nil {
		return fmt.Errorf("blocksize: device is read-only")
	}
	end := off + length
	s := min((off+b.min-1)&^(b.min-1), end)
	e := max(end&^(b.min-1), s)
	if end == b.Size() {
		e = end
	}
	if s > off {
		if _, err := b.WriteAt(make([]byte, s-off), off); err != nil {
			return err
		}
	}
	if e < end {
		if _, err := b.WriteAt(make([]byte, end-e), e); err != nil {
			return err
		}
	}
	return b.split(s, e-s, op)
}

// Flush implements block.Writer.
func (b *BlockSize) Flush() error {
	if b.w == nil {
		return nil
	}
	return b.w.Flush()
}
