package qcow2

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/sinks"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// Images made by qemu-img and qemu-io read byte for byte like `qemu-img
// convert -O raw`, and their extents agree with `qemu-img map`.
func TestReaderAgainstQemu(t *testing.T) {
	src := genDisk(t)
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	qio := func(img string, cmds ...string) {
		args := []string{}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		run(t, "qemu-io", append(args, img)...)
	}
	run(t, "qemu-img", "convert", "-O", "qcow2", src, p("v3.qcow2"))
	run(t, "qemu-img", "convert", "-O", "qcow2", "-o", "compat=0.10", src, p("v2.qcow2"))
	run(t, "qemu-img", "convert", "-c", "-O", "qcow2", src, p("deflate.qcow2"))
	run(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, p("zstd.qcow2"))
	run(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", src, p("deflate4k.qcow2"))
	run(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=2M,compression_type=zstd", src, p("zstd2m.qcow2"))
	// Zero clusters (with and without a host cluster kept), partial writes.
	run(t, "qemu-img", "convert", "-O", "qcow2", src, p("zeros.qcow2"))
	qio(p("zeros.qcow2"), "write -z 1M 3M", "write -z -u 8M 2M", "write -P 0xab 100k 5k", "discard 12M 1M")
	// A chain: v3 base, overlay with data and zero clusters, a v2 top that
	// is larger than its backing file.
	run(t, "qemu-img", "create", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2", p("mid.qcow2"))
	qio(p("mid.qcow2"), "write -P 0x11 0 64k", "write -z 2M 1M", "write -P 0x22 5000k 300k", "write -z 20M 64k")
	run(t, "qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", "-b", "mid.qcow2", "-F", "qcow2", p("top.qcow2"), "40M")
	qio(p("top.qcow2"), "write -P 0x33 30k 10k", "write -P 0x44 30M 1M", "write -P 0x55 2100k 8k")
	// Backing files of other formats, opened through the registry.
	run(t, "qemu-img", "create", "-f", "qcow2", "-b", src, "-F", "raw", p("onraw.qcow2"))
	qio(p("onraw.qcow2"), "write -P 0x66 4M 100k", "write -z 6M 64k")
	run(t, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, p("base.vmdk"))
	run(t, "qemu-img", "create", "-f", "qcow2", "-b", "base.vmdk", "-F", "vmdk", p("onvmdk.qcow2"))
	qio(p("onvmdk.qcow2"), "write -P 0x77 1M 100k", "write -z 7M 128k")

	for _, name := range []string{"v3", "v2", "deflate", "zstd", "deflate4k", "zstd2m", "zeros", "mid", "top", "onraw", "onvmdk"} {
		t.Run(name, func(t *testing.T) {
			path := p(name + ".qcow2")
			img, err := registry().Open(context.Background(), path, sources.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if img.Info.Format != "qcow2" {
				t.Fatalf("probed as %s", img.Info.Format)
			}
			want := qemuRaw(t, path)
			got := readAll(t, img)
			if !bytes.Equal(got, want) {
				t.Fatalf("differs from qemu-img convert -O raw at %d (sizes %d, %d)", firstDiff(got, want), len(got), len(want))
			}
			// Unaligned reads across cluster boundaries too.
			for _, off := range []int64{1, 65535, 4095, int64(len(want)) - 70000} {
				b := make([]byte, 70000)
				if n, err := img.ReadAt(b, off); n != len(b) || err != nil || !bytes.Equal(b, want[off:off+70000]) {
					t.Fatalf("ReadAt(%d): %d, %v, equal=%v", off, n, err, bytes.Equal(b, want[off:off+70000]))
				}
			}
			checkExtents(t, img, want, path)
			if name == "top" || name == "onvmdk" || name == "zstd" {
				// Flatten the chain into one qcow2 with our writer.
				flat := filepath.Join(t.TempDir(), "flat.qcow2")
				convert(t, path, flat, sinks.Options{})
				qemuCheck(t, flat)
				qemuCompare(t, path, flat)
			}
		})
	}
	t.Run("chain-info", func(t *testing.T) {
		img, err := registry().Open(context.Background(), p("top.qcow2"), sources.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		if n := len(img.Info.Layers); n != 3 || img.Info.Layers[0].Props["version"] != "2" || img.Info.Layers[2].Parent != "" {
			t.Fatalf("layers: %+v", img.Info.Layers)
		}
	})
}

// Bad input: a clear error naming the file and the field or offset; no
// panic, no allocation sized by an unchecked field.
func TestReaderBadInput(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.qcow2")
	run(t, "qemu-img", "create", "-f", "qcow2", good, "64M")
	run(t, "qemu-io", "-c", "write -P 1 0 1M", good)
	orig, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	be32 := func(b []byte, off int, v uint32) {
		b[off], b[off+1], b[off+2], b[off+3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
	}
	be64 := func(b []byte, off int, v uint64) { be32(b, off, uint32(v>>32)); be32(b, off+4, uint32(v)) }
	l1off := int(orig[40])<<56 | int(orig[41])<<48 | int(orig[42])<<40 | int(orig[43])<<32 | int(orig[44])<<24 | int(orig[45])<<16 | int(orig[46])<<8 | int(orig[47])
	cases := []struct {
		name, want string
		mutate     func(b []byte) []byte
	}{
		{"truncated", "header", func(b []byte) []byte { return b[:50] }},
		{"truncated-tables", "past the end", func(b []byte) []byte { return b[:4096] }},
		{"version", "version", func(b []byte) []byte { be32(b, 4, 9); return b }},
		{"cluster-bits", "cluster_bits", func(b []byte) []byte { be32(b, 20, 40); return b }},
		{"huge-l1", "l1_size", func(b []byte) []byte { be32(b, 36, 0xffffffff); return b }},
		{"l1-too-small", "l1_size", func(b []byte) []byte { be32(b, 36, 0); return b }},
		{"l1-past-end", "l1_table_offset", func(b []byte) []byte { be64(b, 40, 1<<40); return b }},
		{"l1-entry-past-end", "L1 entry 0", func(b []byte) []byte { be64(b, l1off, 1<<63|1<<40); return b }},
		{"refcount-table", "refcount_table", func(b []byte) []byte { be32(b, 56, 1<<30); return b }},
		{"unknown-feature", "incompatible_features", func(b []byte) []byte { b[72+7] |= 0x80; return b }},
		{"encrypted", "crypt_method", func(b []byte) []byte { be32(b, 32, 1); return b }},
		{"header-length", "header_length", func(b []byte) []byte { be32(b, 100, 13); return b }},
		{"backing-name", "backing_file", func(b []byte) []byte { be64(b, 8, 100000); be32(b, 16, 10); return b }},
		{"compression-type", "compression_type", func(b []byte) []byte { b[104] = 7; b[79] |= IncompatCompression; return b }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := c.mutate(append([]byte(nil), orig...))
			path := filepath.Join(dir, c.name+".qcow2")
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := registry().Open(context.Background(), path, sources.Options{Format: "qcow2"})
			if err == nil {
				img.Close()
				t.Fatal("opened")
			}
			if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("error %q does not name %q and the file", err, c.want)
			}
		})
	}
	// An L2 entry pointing past the end: open succeeds, the read fails.
	t.Run("l2-entry-past-end", func(t *testing.T) {
		b := append([]byte(nil), orig...)
		l2off := int(b[l1off+6])<<8 | int(b[l1off+7]) | int(b[l1off+5])<<16
		be64(b, l2off, 1<<63|1<<41)
		path := filepath.Join(dir, "l2.qcow2")
		os.WriteFile(path, b, 0o644)
		img, err := registry().Open(context.Background(), path, sources.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		if _, err := img.ReadAt(make([]byte, 4096), 0); err == nil || !strings.Contains(err.Error(), "past the end") {
			t.Fatalf("read: %v", err)
		}
		if _, err := img.Extents(context.Background(), 0, img.Size()); err == nil {
			t.Fatal("extents of a bad entry succeeded")
		}
	})
	// Backing file loops, through the registry and through OpenFile.
	t.Run("backing-loop", func(t *testing.T) {
		a, bb := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
		run(t, "qemu-img", "create", "-f", "qcow2", a, "1M")
		run(t, "qemu-img", "create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", bb, "1M")
		run(t, "qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
		_, err := registry().Open(context.Background(), a, sources.Options{})
		if err == nil || !strings.Contains(err.Error(), "loop") {
			t.Fatalf("registry: %v", err)
		}
		if _, err := OpenFile(a); err == nil || !strings.Contains(err.Error(), "loop") {
			t.Fatalf("OpenFile: %v", err)
		}
		self := filepath.Join(dir, "self.qcow2")
		run(t, "qemu-img", "create", "-f", "qcow2", self, "1M")
		run(t, "qemu-img", "rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", self)
		if _, err := registry().Open(context.Background(), self, sources.Options{}); err == nil || !strings.Contains(err.Error(), "loop") {
			t.Fatalf("self loop: %v", err)
		}
	})
	t.Run("missing-backing", func(t *testing.T) {
		m := filepath.Join(dir, "m.qcow2")
		run(t, "qemu-img", "create", "-f", "qcow2", "-u", "-b", "nowhere.raw", "-F", "raw", m, "1M")
		_, err := registry().Open(context.Background(), m, sources.Options{})
		if err == nil || !strings.Contains(err.Error(), "nowhere.raw") || !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%v", err)
		}
	})
	// A corrupt compressed cluster is an error naming the guest offset.
	t.Run("bad-compressed", func(t *testing.T) {
		c := filepath.Join(dir, "c.qcow2")
		src := genDisk(t)
		run(t, "qemu-img", "convert", "-c", "-O", "qcow2", src, c)
		im, err := OpenFile(c)
		if err != nil {
			t.Fatal(err)
		}
		var victim entry
		var guest int64
		for vc := int64(0); vc < im.size/im.cs; vc++ {
			e, err := im.lookup(vc)
			if err != nil {
				t.Fatal(err)
			}
			if e.kind == kindCompressed {
				victim, guest = e, vc*im.cs
				break
			}
		}
		im.Close()
		if victim.kind != kindCompressed {
			t.Fatal("no compressed cluster")
		}
		b, _ := os.ReadFile(c)
		for i := range 64 {
			b[int(victim.host)+i] ^= 0x5a
		}
		os.WriteFile(c, b, 0o644)
		im, err = OpenFile(c)
		if err != nil {
			t.Fatal(err)
		}
		defer im.Close()
		if _, err := im.ReadAt(make([]byte, 100), guest); err == nil || !strings.Contains(err.Error(), "compressed cluster") {
			t.Fatalf("%v", err)
		}
	})
}
