package diskgen

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

func TestLayoutMix(t *testing.T) {
	size := int64(1 << 30)
	runs := Layout(size, 1)
	var by [4]int64
	pos := int64(0)
	for _, r := range runs {
		if r.Off != pos || r.Len <= 0 || r.Len > 2<<20 {
			t.Fatalf("bad run %+v at %d", r, pos)
		}
		pos += r.Len
		by[r.Kind] += r.Len
	}
	if pos != size {
		t.Fatalf("runs cover %d, want %d", pos, size)
	}
	want := [4]float64{0.40, 0.20, 0.30, 0.10}
	for k, w := range want {
		got := float64(by[k]) / float64(size)
		if got < w-0.05 || got > w+0.05 {
			t.Errorf("kind %d: %.2f of the disk, want about %.2f", k, got, w)
		}
	}
}

func TestDeterministic(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	if _, err := Write(context.Background(), a, 32<<20, 7); err != nil {
		t.Fatal(err)
	}
	if _, err := Write(context.Background(), b, 32<<20, 7); err != nil {
		t.Fatal(err)
	}
	x, _ := os.ReadFile(a)
	y, _ := os.ReadFile(b)
	if !bytes.Equal(x, y) {
		t.Fatal("same seed gave different disks")
	}
	if _, err := Write(context.Background(), b, 32<<20, 8); err != nil {
		t.Fatal(err)
	}
	y, _ = os.ReadFile(b)
	if bytes.Equal(x, y) {
		t.Fatal("different seeds gave the same disk")
	}
}
