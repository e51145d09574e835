package vmdk

// Fuzz targets for every parser, seeded from the samples. Under plain
// `go test` they run their seeds; `go test -fuzz=FuzzOpen` explores.

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// seedFiles returns the decompressed samples (and generated COWD/seSparse
// extents) small enough to be fuzz seeds.
func seedFiles(f *testing.F) map[string][]byte {
	f.Helper()
	dir := f.TempDir()
	out := map[string][]byte{}
	for _, name := range []string{
		"streamOptimized.vmdk", "streamOptimizedWithMarkers.vmdk", "openvmdk-stream-32M.vmdk",
		"iotest-version3.vmdk", "afl9.vmdk", "player9-descriptor.vmdk", "sesparse.vmdk",
		"twoGbMaxExtentSparse.vmdk", "vmfs_thick.vmdk", "vmfs_thick-000001.vmdk",
	} {
		b, err := os.ReadFile(sample(f, dir, name))
		if err != nil {
			f.Fatal(err)
		}
		out[name] = b
	}
	writeCOWD(f, filepath.Join(dir, "cowd"), 9000, map[uint32]cowdGrain{3: pattern(512, 1), 4: nil, 8191: pattern(512, 2)})
	writeSESparse(f, filepath.Join(dir, "sesparse"), 70000, map[uint64]seGrain{1: {typ: seAlloc, data: pattern(4096, 1)}, 2: {typ: seZero}, 5000: {typ: seUnmapped}}, false)
	for _, n := range []string{"cowd", "sesparse"} {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			f.Fatal(err)
		}
		out[n] = b
	}
	return out
}

func FuzzParseDescriptor(f *testing.F) {
	for _, b := range seedFiles(f) {
		if h, err := ParseSparseHeader(b); err == nil && h.DescriptorOffset > 0 {
			off := int64(h.DescriptorOffset) * 512
			f.Add(b[off:min(int64(len(b)), off+int64(h.DescriptorSize)*512)])
		} else if LooksLikeDescriptor(b) {
			f.Add(b)
		}
	}
	f.Add([]byte("createType=\"x\"\r\nRW 1 FLAT \"a \"b\" c\" 7\r\nRDONLY 0 ZERO\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := ParseDescriptor(b)
		if err != nil {
			return
		}
		for _, e := range d.Extents {
			if e.Sectors < 0 || e.Sectors > maxSectors || e.Offset < 0 || e.Offset > maxSectors {
				t.Fatalf("extent out of range: %+v", e)
			}
		}
	})
}

func FuzzParseSparseHeader(f *testing.F) {
	for _, b := range seedFiles(f) {
		if len(b) >= 512 {
			f.Add(b[:512])
		}
		if len(b) >= 1536 {
			f.Add(b[len(b)-1024 : len(b)-512]) // a footer, when there is one
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseSparseHeader(b)
		if err != nil {
			return
		}
		if h.GrainSize == 0 || h.GrainSize > maxGrainSectors || h.NumGTEsPerGT == 0 || h.Capacity > maxSectors {
			t.Fatalf("accepted out-of-range header %+v", h)
		}
	})
}

func FuzzParseCOWDHeader(f *testing.F) {
	for _, b := range seedFiles(f) {
		if len(b) >= 2048 {
			f.Add(b[:2048])
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseCOWDHeader(b)
		if err != nil {
			return
		}
		if h.GrainSize == 0 || h.GrainSize > maxGrainSectors {
			t.Fatalf("accepted out-of-range header %+v", h)
		}
	})
}

func FuzzParseSESparseHeader(f *testing.F) {
	for _, b := range seedFiles(f) {
		if len(b) >= 1024 {
			f.Add(b[:1024])
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if h, err := ParseSESparseHeader(b); err == nil && (h.GrainSize != 8 || h.GrainTableSize != 64) {
			t.Fatalf("accepted %+v", h)
		}
		if len(b) >= 544 {
			ParseSESparseVolatile(b[512:])
		}
	})
}

// FuzzOpen opens a whole file (descriptor or monolithic extent) from
// memory, then maps and reads its start: no panic, no hang, no huge
// allocation, whatever the headers claim.
func FuzzOpen(f *testing.F) {
	for name, b := range seedFiles(f) {
		if len(b) <= 1<<20 || name == "streamOptimizedWithMarkers.vmdk" {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fsys := memFS{"d.vmdk": b, "flat.raw": bytes.Repeat([]byte{1}, 4096)}
		ctx := context.Background()
		c, err := Open(ctx, fsys, "d.vmdk", nil, Options{AllowStaleChain: true})
		if err != nil {
			if !strings.Contains(err.Error(), "mem:") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		defer c.Close()
		n := min(c.Size(), 16<<20)
		exts, err := c.Extents(ctx, 0, n)
		if err != nil {
			if !strings.Contains(err.Error(), "mem:") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		if err := block.Check(exts, 0, n); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, min(n, 1<<20))
		for _, off := range []int64{0, max(0, c.Size()-700)} {
			if _, err := c.ReadAt(buf, off); err != nil && err != io.EOF && !strings.Contains(err.Error(), "mem:") {
				t.Fatalf("error does not name the file: %v", err)
			}
		}
	})
}
