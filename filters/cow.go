package filters

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// COW is a copy-on-write overlay over a read-only device. It implements
// block.Writable; the device below is only ever read.
type COW struct {
	base  block.Device
	store *os.File // sparse, unlinked temp file; blocks at their own offset
	bs    int64

	mu     sync.RWMutex
	blocks map[int64]cowState // block index -> state; absent = from base
}

type cowState uint8

const (
	cowData cowState = iota + 1 // the block's bytes are in the store
	cowZero                     // reads zero, reported as Zero
	cowTrim                     // reads zero, reported as Hole
)

// COWOptions tune an overlay.
type COWOptions struct {
	// BlockSize is the overlay's granularity (default 64 KiB, power of two).
	BlockSize int64
	// Dir holds the overlay's temporary file (default os.TempDir()).
	Dir string
}

// NewCOW returns an overlay over base. The overlay's bytes live in an
// unlinked temporary file, so they vanish when the process ends.
func NewCOW(base block.Device, opts COWOptions) (*COW, error) {
	bs := opts.BlockSize
	if bs <= 0 {
		bs = 64 << 10
	}
	if bs&(bs-1) != 0 {
		return nil, fmt.Errorf("cow: block size %d is not a power of two", bs)
	}
	f, err := os.CreateTemp(opts.Dir, "vmdk2kvm-cow-*")
	if err != nil {
		return nil, fmt.Errorf("cow: creating overlay file: %w", err)
	}
	os.Remove(f.Name())
	if err := f.Truncate(base.Size()); err != nil {
		f.Close()
		return nil, fmt.Errorf("cow: sizing overlay file: %w", err)
	}
	return &COW{base: base, store: f, bs: bs, blocks: map[int64]cowState{}}, nil
}

// Size implements block.Device.
func (c *COW) Size() int64 { return c.base.Size() }

// ReadAt implements block.Device.
func (c *COW) ReadAt(p []byte, off int64) (int, error) {
	n, eof := block.ShortRead(p, off, c.Size())
	c.mu.RLock()
	defer c.mu.RUnlock()
	// Group consecutive blocks with the same source into one read.
	for done := 0; done < n; {
		pos := off + int64(done)
		st := c.blocks[pos/c.bs]
		end := pos
		for end < off+int64(n) && c.blocks[end/c.bs] == st {
			end = (end/c.bs + 1) * c.bs
		}
		end = min(end, off+int64(n))
		q := p[done : done+int(end-pos)]
		switch st {
		case 0:
			if err := readFull(c.base, q, pos); err != nil {
				return done, err
			}
		case cowData:
			if err := readFull(c.store, q, pos); err != nil {
				return done, fmt.Errorf("cow: reading overlay at %d: %w", pos, err)
			}
		default:
			clear(q)
		}
		done += len(q)
	}
	return n, eof
}

func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// WriteAt implements block.Writer. Partial blocks are filled from below first.
func (c *COW) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > c.Size() {
		return 0, fmt.Errorf("cow: write [%d,+%d) outside size %d", off, len(p), c.Size())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	end := off + int64(len(p))
	for _, edge := range []int64{off, end} {
		idx := edge / c.bs
		if edge%c.bs == 0 || c.blocks[idx] == cowData {
			continue
		}
		if err := c.materialise(idx); err != nil {
			return 0, err
		}
	}
	if _, err := c.store.WriteAt(p, off); err != nil {
		return 0, fmt.Errorf("cow: writing overlay at %d: %w", off, err)
	}
	for idx := off / c.bs; idx*c.bs < end; idx++ {
		c.blocks[idx] = cowData
	}
	return len(p), nil
}

// materialise copies block idx, as it currently reads, into the store.
func (c *COW) materialise(idx int64) error {
	s := idx * c.bs
	n := min(c.bs, c.Size()-s)
	buf := make([]byte, n)
	if c.blocks[idx] == 0 {
		if err := readFull(c.base, buf, s); err != nil {
			return fmt.Errorf("cow: reading base block at %d: %w", s, err)
		}
	}
	if _, err := c.store.WriteAt(buf, s); err != nil {
		return fmt.Errorf("cow: writing overlay at %d: %w", s, err)
	}
	c.blocks[idx] = cowData
	return nil
}

func (c *COW) clearRange(off, length int64, st cowState) error {
	if off < 0 || length < 0 || off+length > c.Size() {
		return fmt.Errorf("cow: range [%d,+%d) outside size %d", off, length, c.Size())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	end := off + length
	for idx := off / c.bs; idx*c.bs < end; idx++ {
		s, e := max(idx*c.bs, off), min((idx+1)*c.bs, end, c.Size())
		whole := s == idx*c.bs && (e == (idx+1)*c.bs || e == c.Size())
		if whole {
			c.blocks[idx] = st
			continue
		}
		if c.blocks[idx] != cowData {
			if err := c.materialise(idx); err != nil {
				return err
			}
		}
		if _, err := c.store.WriteAt(make([]byte, e-s), s); err != nil {
			return fmt.Errorf("cow: zeroing overlay at %d: %w", s, err)
		}
	}
	return nil
}

// Zero implements block.Writer.
func (c *COW) Zero(off, length int64) error { return c.clearRange(off, length, cowZero) }

// Trim implements block.Writable: the range reads as zeros afterwards.
func (c *COW) Trim(off, length int64) error { return c.clearRange(off, length, cowTrim) }

// Flush implements block.Writer. The overlay is temporary; nothing to sync.
func (c *COW) Flush() error { return nil }

// Close implements block.Device; it closes the device below too.
func (c *COW) Close() error {
	err := c.store.Close()
	if e := c.base.Close(); err == nil {
		err = e
	}
	return err
}

// Extents implements block.Device: overlay blocks are Data, Zero or Hole by
// how they were last written; the rest is what the device below reports.
func (c *COW) Extents(ctx context.Context, off, length int64) ([]block.Extent, error) {
	off, length = block.ClipRange(c.Size(), off, length)
	end := off + length
	c.mu.RLock()
	idxs := make([]int64, 0)
	for idx := range c.blocks {
		if idx*c.bs < end && (idx+1)*c.bs > off {
			idxs = append(idxs, idx)
		}
	}
	sort.Slice(idxs, func(i, j int) bool { return idxs[i] < idxs[j] })
	type seg struct {
		s, e int64
		st   cowState
	}
	segs := make([]seg, 0, len(idxs))
	for _, idx := range idxs {
		segs = append(segs, seg{max(idx*c.bs, off), min((idx+1)*c.bs, end), c.blocks[idx]})
	}
	c.mu.RUnlock()

	var out []block.Extent
	below := func(s, e int64) error {
		if s >= e {
			return nil
		}
		sub, err := c.base.Extents(ctx, s, e-s)
		if err != nil {
			return err
		}
		if err := block.Check(sub, s, e-s); err != nil {
			return fmt.Errorf("cow: base extents: %w", err)
		}
		for _, x := range sub {
			out = block.Append(out, x)
		}
		return nil
	}
	pos := off
	for _, sg := range segs {
		if err := below(pos, sg.s); err != nil {
			return nil, err
		}
		t := map[cowState]block.ExtentType{cowData: block.Data, cowZero: block.Zero, cowTrim: block.Hole}[sg.st]
		out = block.Append(out, block.Extent{Off: sg.s, Len: sg.e - sg.s, Type: t})
		pos = sg.e
	}
	if err := below(pos, end); err != nil {
		return nil, err
	}
	return out, nil
}

// Changed returns the ranges written, zeroed or trimmed through the overlay,
// merged and sorted: what a commit of the overlay would have to copy.
func (c *COW) Changed() []block.Extent {
	c.mu.RLock()
	idxs := make([]int64, 0, len(c.blocks))
	for idx := range c.blocks {
		idxs = append(idxs, idx)
	}
	c.mu.RUnlock()
	sort.Slice(idxs, func(i, j int) bool { return idxs[i] < idxs[j] })
	var out []block.Extent
	for _, idx := range idxs {
		s := idx * c.bs
		out = block.Append(out, block.Extent{Off: s, Len: min(c.bs, c.Size()-s), Type: block.Data})
	}
	return out
}
