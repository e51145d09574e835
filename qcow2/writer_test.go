package qcow2

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sinks"
)

// Every image the streaming writer makes passes qemu-img check with no
// errors and no leaks, has the format, size, cluster size and compression
// type asked for, and qemu-img compare finds it identical to the source.
func TestWriterQemu(t *testing.T) {
	src := genDisk(t)
	cases := []sinks.Options{
		{ClusterSize: 4 << 10},
		{},
		{ClusterSize: 2 << 20},
		{ClusterSize: 4 << 10, Compress: "deflate"},
		{Compress: "deflate"},
		{ClusterSize: 2 << 20, Compress: "deflate"},
		{ClusterSize: 4 << 10, Compress: "zstd"},
		{Compress: "zstd", CompressLevel: 9},
		{ClusterSize: 2 << 20, Compress: "zstd"},
		{Preallocation: "metadata"},
		{ClusterSize: 2 << 20, Preallocation: "metadata"},
	}
	for _, o := range cases {
		t.Run(fmt.Sprintf("cs%d-%s-%s", o.ClusterSize, o.Compress, o.Preallocation), func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "out.qcow2")
			convert(t, src, dst, o)
			r := qemuCheck(t, dst)
			info := qemuInfo(t, dst)
			wantCS := o.ClusterSize
			if wantCS == 0 {
				wantCS = DefaultClusterSize
			}
			wantComp := "zlib"
			if o.Compress == "zstd" {
				wantComp = "zstd"
			}
			if info.Format != "qcow2" || info.VirtualSize != diskSize || info.ClusterSize != wantCS ||
				info.Specific.Data.CompressionType != wantComp || info.Specific.Data.Compat != "1.1" {
				t.Fatalf("qemu-img info: %+v", info)
			}
			if o.Compress != "" && r.Compressed == 0 {
				t.Fatalf("no compressed clusters: %+v", r)
			}
			if o.Compress == "" && r.Compressed != 0 {
				t.Fatalf("compressed clusters in an uncompressed image: %+v", r)
			}
			if o.Preallocation == "metadata" && r.Allocated != (diskSize+wantCS-1)/wantCS {
				t.Fatalf("preallocation=metadata allocated %d clusters", r.Allocated)
			}
			qemuCompare(t, src, dst)
			// Our reader agrees with qemu on our own output.
			im, err := OpenFile(dst)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			want, _ := os.ReadFile(src)
			if got := readAll(t, im); !bytes.Equal(got, want) {
				t.Fatalf("our reader differs from the source at %d", firstDiff(got, want))
			}
		})
	}
}

// VMDK sources made by qemu-img (monolithicSparse, streamOptimized), read
// by sources/vmdk, written by us: identical to the raw disk for qemu.
func TestWriterFromVMDK(t *testing.T) {
	src := genDisk(t)
	for _, sub := range []string{"monolithicSparse", "streamOptimized", "monolithicFlat", "twoGbMaxExtentSparse"} {
		t.Run(sub, func(t *testing.T) {
			dir := t.TempDir()
			v := filepath.Join(dir, "disk.vmdk")
			run(t, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat="+sub, src, v)
			for _, comp := range []string{"", "zstd"} {
				dst := filepath.Join(dir, "out"+comp+".qcow2")
				convert(t, v, dst, sinks.Options{Compress: comp})
				qemuCheck(t, dst)
				qemuCompare(t, src, dst)
				qemuCompare(t, v, dst)
			}
		})
	}
}

// Writes arriving out of order, in odd sizes, overlapping earlier ones and
// then zeroed, from several goroutines: the image reads like the model.
func TestWriterRandomWrites(t *testing.T) {
	for _, o := range []sinks.Options{{ClusterSize: 4096}, {ClusterSize: 65536, Compress: "deflate"}, {ClusterSize: 65536, Compress: "zstd"}, {Preallocation: "metadata"}} {
		t.Run(fmt.Sprintf("%d-%s-%s", o.ClusterSize, o.Compress, o.Preallocation), func(t *testing.T) {
			const size = 3<<20 + 1234
			dir := t.TempDir()
			dst := filepath.Join(dir, "out.qcow2")
			w, err := Create(dst, size, o)
			if err != nil {
				t.Fatal(err)
			}
			w.maxPend = 3 * w.cs // evict partial clusters early and often
			model := block.NewMemory(size, 512)
			rng := rand.New(rand.NewPCG(1, 2))
			type op struct {
				off  int64
				data []byte
			}
			// Disjoint concurrent writes (like the copier) ...
			var ops []op
			for off := int64(0); off < size; {
				n := min(int64(rng.IntN(200<<10)+1), size-off)
				if rng.IntN(3) > 0 {
					d := make([]byte, n)
					for i := range d {
						d[i] = byte(rng.IntN(4))
					}
					ops = append(ops, op{off, d})
				}
				off += n
			}
			rng.Shuffle(len(ops), func(i, j int) { ops[i], ops[j] = ops[j], ops[i] })
			var wg sync.WaitGroup
			errs := make(chan error, len(ops))
			for k := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := k; i < len(ops); i += 4 {
						if _, err := w.WriteAt(ops[i].data, ops[i].off); err != nil {
							errs <- err
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			for _, o := range ops {
				model.WriteAt(o.data, o.off)
			}
			// ... then overlapping rewrites and zeroes, one at a time.
			for range 40 {
				off := rng.Int64N(size)
				n := min(rng.Int64N(150<<10)+1, size-off)
				if rng.IntN(3) == 0 {
					if err := w.Zero(off, n); err != nil {
						t.Fatal(err)
					}
					model.Zero(off, n)
					continue
				}
				d := make([]byte, n)
				for i := range d {
					d[i] = byte(rng.IntN(256))
				}
				if _, err := w.WriteAt(d, off); err != nil {
					t.Fatal(err)
				}
				model.WriteAt(d, off)
			}
			if err := w.Commit(context.Background()); err != nil {
				t.Fatal(err)
			}
			ref := filepath.Join(dir, "model.raw")
			if err := os.WriteFile(ref, readAll(t, model), 0o644); err != nil {
				t.Fatal(err)
			}
			qemuCheck(t, dst)
			qemuCompare(t, ref, dst)
		})
	}
}

// Abort and a failed copy leave nothing behind; the final name appears only
// on Commit.
func TestWriterAbortLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	dst := filepath.Join(dir, "out.qcow2")
	w, err := Create(dst, 1<<20, sinks.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt([]byte("hello"), 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dst); !os.IsNotExist(err) {
		t.Fatalf("final name exists before Commit: %v", err)
	}
	if err := w.Abort(); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("left behind: %v", ents)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	w, _ = Create(dst, 1<<20, sinks.Options{})
	if err := w.Commit(ctx); err == nil {
		t.Fatal("Commit with a cancelled context succeeded")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("left behind: %v", ents)
	}
	if _, err := w.WriteAt([]byte("x"), 0); err == nil {
		t.Fatal("write after Commit/Abort succeeded")
	}
	if _, err := Create(dst, 1<<20, sinks.Options{ClusterSize: 3000}); err == nil {
		t.Fatal("cluster size 3000 accepted")
	}
	if _, err := Create(dst, 1<<20, sinks.Options{Compress: "lz4"}); err == nil {
		t.Fatal("unknown compression accepted")
	}
	if _, err := w.WriteAt([]byte("x"), 1<<20); err == nil {
		t.Fatal("write past the end accepted")
	}
}
