package filters

import (
	"bytes"
	"context"
	"crypto/sha256"
	"math/rand/v2"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// randomBase returns a memory device with scattered data, zero pages and holes.
func randomBase(t *testing.T, r *rand.Rand, size int64) *block.Memory {
	t.Helper()
	m := block.NewMemory(size, 4096)
	for range 40 {
		off := r.Int64N(size)
		n := min(r.Int64N(200<<10)+1, size-off)
		buf := make([]byte, n)
		for i := range buf {
			buf[i] = byte(r.IntN(256))
		}
		if _, err := m.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
		if r.IntN(3) == 0 {
			zo := r.Int64N(size)
			if err := m.Zero(zo, min(r.Int64N(100<<10)+1, size-zo)); err != nil {
				t.Fatal(err)
			}
		}
	}
	return m
}

func digest(t *testing.T, d block.Device) [32]byte {
	t.Helper()
	buf := make([]byte, d.Size())
	if _, err := d.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(buf)
}

// clone copies a memory device's bytes into a fresh one.
func clone(t *testing.T, m *block.Memory) *block.Memory {
	t.Helper()
	c := block.NewMemory(m.Size(), 4096)
	buf := make([]byte, m.Size())
	m.ReadAt(buf, 0)
	c.WriteAt(buf, 0)
	return c
}

// TestCOWAgainstModel applies random operations to an overlay and to a plain
// memory model; reads must agree, extents must be exact (every hole or zero
// extent reads as zeros, data covers everything non-zero), and the base must
// never change.
func TestCOWAgainstModel(t *testing.T) {
	ctx := context.Background()
	for seed := range uint64(12) {
		r := rand.New(rand.NewPCG(seed, 99))
		size := int64(1<<20) + r.Int64N(3)*4096 + r.Int64N(2)*513 // odd sizes too
		base := randomBase(t, r, size)
		before := digest(t, base)
		model := clone(t, base)
		cow, err := NewCOW(base, COWOptions{BlockSize: int64(4096) << r.IntN(5), Dir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		for op := range 300 {
			off := r.Int64N(size)
			n := min(r.Int64N(150<<10)+1, size-off)
			switch r.IntN(5) {
			case 0, 1:
				buf := make([]byte, n)
				for i := range buf {
					buf[i] = byte(r.IntN(255) + 1)
				}
				if _, err := cow.WriteAt(buf, off); err != nil {
					t.Fatal(err)
				}
				model.WriteAt(buf, off)
			case 2:
				if err := cow.Zero(off, n); err != nil {
					t.Fatal(err)
				}
				model.Zero(off, n)
			case 3:
				if err := cow.Trim(off, n); err != nil {
					t.Fatal(err)
				}
				model.Trim(off, n)
			case 4:
				got, want := make([]byte, n), make([]byte, n)
				if _, err := cow.ReadAt(got, off); err != nil {
					t.Fatal(err)
				}
				model.ReadAt(want, off)
				if !bytes.Equal(got, want) {
					t.Fatalf("seed %d op %d: read [%d,+%d) differs from model", seed, op, off, n)
				}
			}
		}
		if digest(t, cow) != digest(t, model) {
			t.Fatalf("seed %d: overlay content differs from model", seed)
		}
		exts, err := cow.Extents(ctx, 0, size)
		if err != nil {
			t.Fatal(err)
		}
		if err := block.Check(exts, 0, size); err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		for _, e := range exts {
			if e.Type.ReadsZero() {
				buf := make([]byte, e.Len)
				cow.ReadAt(buf, e.Off)
				if !block.IsZero(buf) {
					t.Fatalf("seed %d: extent %+v is %s but reads non-zero", seed, e, e.Type)
				}
			}
		}
		if digest(t, base) != before {
			t.Fatalf("seed %d: the base device was modified", seed)
		}
		cow.Close()
	}
}

func TestCOWExtentTypes(t *testing.T) {
	ctx := context.Background()
	base := block.NewMemory(1<<20, 4096)
	base.WriteAt(bytes.Repeat([]byte{1}, 1<<20), 0)
	cow, err := NewCOW(base, COWOptions{BlockSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer cow.Close()
	cow.Zero(0, 64<<10)
	cow.Trim(128<<10, 128<<10)
	exts, _ := cow.Extents(ctx, 0, 1<<20)
	want := []block.Extent{
		{Off: 0, Len: 64 << 10, Type: block.Zero},
		{Off: 64 << 10, Len: 64 << 10, Type: block.Data},
		{Off: 128 << 10, Len: 128 << 10, Type: block.Hole},
		{Off: 256 << 10, Len: 768 << 10, Type: block.Data},
	}
	if len(exts) != len(want) {
		t.Fatalf("extents %v, want %v", exts, want)
	}
	for i := range want {
		if exts[i] != want[i] {
			t.Fatalf("extent %d = %+v, want %+v", i, exts[i], want[i])
		}
	}
	if ch := cow.Changed(); len(ch) != 2 || ch[0].Len != 64<<10 || ch[1].Off != 128<<10 {
		t.Fatalf("Changed() = %v", ch)
	}
}
