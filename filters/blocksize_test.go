package filters

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// strict is a memory device that refuses requests which are unaligned or too
// long, as some transports and servers do.
type strict struct {
	*block.Memory
	min, max int64
}

func (s *strict) check(off, n int64) error {
	if off%s.min != 0 || (n%s.min != 0 && off+n != s.Size()) || n > s.max {
		return fmt.Errorf("bad request [%d,+%d)", off, n)
	}
	return nil
}
func (s *strict) ReadAt(p []byte, off int64) (int, error) {
	if err := s.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return s.Memory.ReadAt(p, off)
}
func (s *strict) WriteAt(p []byte, off int64) (int, error) {
	if err := s.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return s.Memory.WriteAt(p, off)
}
func (s *strict) Zero(off, n int64) error {
	if err := s.check(off, n); err != nil {
		return err
	}
	return s.Memory.Zero(off, n)
}
func (s *strict) Trim(off, n int64) error {
	if err := s.check(off, n); err != nil {
		return err
	}
	return s.Memory.Trim(off, n)
}

func TestBlockSizeOddOffsets(t *testing.T) {
	const size = 1<<20 + 4096*3
	r := rand.New(rand.NewPCG(5, 5))
	dev := &strict{Memory: block.NewMemory(size, 4096), min: 4096, max: 64 << 10}
	model := block.NewMemory(size, 4096)
	b, err := NewBlockSize(dev, 4096, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	for op := range 400 {
		off := r.Int64N(size)
		n := min(r.Int64N(300<<10)+1, size-off)
		switch r.IntN(4) {
		case 0:
			buf := make([]byte, n)
			for i := range buf {
				buf[i] = byte(r.IntN(256))
			}
			if _, err := b.WriteAt(buf, off); err != nil {
				t.Fatalf("op %d: write [%d,+%d): %v", op, off, n, err)
			}
			model.WriteAt(buf, off)
		case 1:
			if err := b.Zero(off, n); err != nil {
				t.Fatalf("op %d: zero [%d,+%d): %v", op, off, n, err)
			}
			model.Zero(off, n)
		case 2:
			if err := b.Trim(off, n); err != nil {
				t.Fatalf("op %d: trim [%d,+%d): %v", op, off, n, err)
			}
			model.Trim(off, n)
		case 3:
			got, want := make([]byte, n), make([]byte, n)
			if _, err := b.ReadAt(got, off); err != nil {
				t.Fatalf("op %d: read [%d,+%d): %v", op, off, n, err)
			}
			model.ReadAt(want, off)
			if !bytes.Equal(got, want) {
				t.Fatalf("op %d: read [%d,+%d) differs", op, off, n)
			}
		}
	}
	if _, err := NewBlockSize(dev, 3000, 4096); err == nil {
		t.Fatal("non-power-of-two min accepted")
	}
}
