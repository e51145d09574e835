package vmdk

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
)

// convertTo makes a VMDK of the shared diskgen disk with qemu-img.
func convertTo(t *testing.T, dir, subformat string, extra ...string) string {
	t.Helper()
	out := filepath.Join(dir, "disk.vmdk")
	o := "subformat=" + subformat
	for _, e := range extra {
		o += "," + e
	}
	run(t, "qemu-img", "convert", "-O", "vmdk", "-o", o, baseRaw, out)
	return out
}

// Every subformat qemu-img writes reads like qemu-img reads it: bytes and map.
func TestQemuSubformats(t *testing.T) {
	for _, sub := range []string{"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"} {
		t.Run(sub, func(t *testing.T) {
			img := convertTo(t, t.TempDir(), sub, "hwversion=14", "adapter_type=lsilogic")
			c := checkOracle(t, img, Options{})
			info := c.Info()
			if info.Format != "vmdk" || info.VirtualSize != 64<<20 || len(info.Layers) != 1 || info.Layers[0].Subformat != sub {
				t.Fatalf("info: %+v", info)
			}
			if info.Props["adapter_type"] != "lsilogic" || info.Props["hardware_version"] != "14" {
				t.Fatalf("props: %v", info.Props)
			}
			// The whole device, read in pieces, equals qemu's conversion.
			want, err := os.ReadFile(img + ".qemu.raw")
			if err != nil {
				t.Fatal(err)
			}
			randomReads(t, c, want)
		})
	}
}

// randomReads reads random unaligned ranges from 8 goroutines at once and
// compares them with want (the copier calls ReadAt concurrently).
func randomReads(t *testing.T, d block.Device, want []byte) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 9))
			buf := make([]byte, 3<<20)
			for range 150 {
				off := r.Int64N(int64(len(want)))
				n := 1 + r.Int64N(min(int64(len(buf)), int64(len(want))-off+1000))
				got, err := d.ReadAt(buf[:n], off)
				end := min(off+n, int64(len(want)))
				if int64(got) != end-off || (err != nil && !(errors.Is(err, io.EOF) && off+n > int64(len(want)))) {
					errs <- fmt.Errorf("ReadAt(+%d at %d) = %d, %v", n, off, got, err)
					return
				}
				if !bytes.Equal(buf[:got], want[off:end]) {
					errs <- fmt.Errorf("ReadAt(+%d at %d): bytes differ", n, off)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// A disk larger than 2 GiB: several 2 GiB extent files, with data written
// across the extent boundaries.
func TestQemuMultiExtent(t *testing.T) {
	for _, sub := range []string{"twoGbMaxExtentSparse", "twoGbMaxExtentFlat"} {
		t.Run(sub, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "big.vmdk")
			run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sub, img, "5G")
			run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0x11 2047M 2M", "-c", "write -P 0x22 4095M 1M", "-c", "write -P 0x33 5119M 1M", "-c", "write -P 0x44 0 4096", img)
			c := checkOracle(t, img, Options{})
			if n := len(c.layers[0].exts); n != 3 {
				t.Fatalf("%d extents, want 3", n)
			}
		})
	}
}

// zeroed_grain=on with write -z stores zeroed-grain GTEs (1), which read
// as zeros, are Zero in the map, and mask the parent.
func TestQemuZeroedGrain(t *testing.T) {
	dir := t.TempDir()
	img := convertTo(t, dir, "monolithicSparse", "zeroed_grain=on")
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -z 0 1M", "-c", "write -z 5M 256k", img)
	c := checkOracle(t, img, Options{})
	exts, err := c.LayerExtents(t.Context(), 0, 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(exts) != 1 || exts[0].Type != block.Zero {
		t.Fatalf("zeroed grains map as %v, want one Zero extent", exts)
	}
	// In a child: zeroed grains mask the parent's data.
	child := filepath.Join(dir, "child.vmdk")
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", "disk.vmdk", "-F", "vmdk", child)
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -z 2M 1M", child)
	c = checkOracle(t, child, Options{})
	exts, err = c.Extents(t.Context(), 2<<20, 1<<20)
	if err != nil || len(exts) != 1 || exts[0].Type != block.Zero {
		t.Fatalf("zeroed grains over parent data map as %v, %v; want one Zero extent", exts, err)
	}
}

// makeChain builds base (monolithicSparse, the diskgen disk) <- s1
// (monolithicSparse) <- s2 (twoGbMaxExtentSparse, text descriptor), with
// writes that cover partial grains, whole grains, and zeroes.
func makeChain(t *testing.T, dir string) (base, s1, s2 string) {
	t.Helper()
	base = convertTo(t, dir, "monolithicSparse")
	s1 = filepath.Join(dir, "s1.vmdk")
	s2 = filepath.Join(dir, "s2.vmdk")
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-b", "disk.vmdk", "-F", "vmdk", s1)
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0x55 1M 2M", "-c", "write -P 0x56 9437696 4608", "-c", "write -P 0x57 60M 64k", s1)
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse,zeroed_grain=on", "-b", "s1.vmdk", "-F", "vmdk", s2)
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0xaa 2M 512", "-c", "write -z 20M 1M", "-c", "write -P 0xab 63M 1M", s2)
	return
}

func TestQemuChain(t *testing.T) {
	dir := t.TempDir()
	_, s1, s2 := makeChain(t, dir)
	checkOracle(t, s1, Options{})
	c := checkOracle(t, s2, Options{})
	l := c.Layers()
	if len(l) != 3 {
		t.Fatalf("%d layers, want 3", len(l))
	}
	for i := range 2 {
		if l[i].ParentID != l[i+1].ID || l[i].Parent == "" {
			t.Fatalf("layer %d: parent %q id %s, next layer id %s", i, l[i].Parent, l[i].ParentID, l[i+1].ID)
		}
	}
	if l[0].Subformat != "twoGbMaxExtentSparse" || l[1].Parent != "disk.vmdk" || l[2].Parent != "" {
		t.Fatalf("layers: %+v", l)
	}
	// s2's own map: the grains it wrote (64 KiB grains), zeroed ones Zero.
	got, err := c.LayerExtents(t.Context(), 0, 0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	want := []block.Extent{
		{Off: 0, Len: 2 << 20, Type: block.Hole},
		{Off: 2 << 20, Len: 64 << 10, Type: block.Data},
		{Off: 2<<20 + 64<<10, Len: 18<<20 - 64<<10, Type: block.Hole},
		{Off: 20 << 20, Len: 1 << 20, Type: block.Zero},
		{Off: 21 << 20, Len: 42 << 20, Type: block.Hole},
		{Off: 63 << 20, Len: 1 << 20, Type: block.Data},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("LayerExtents(0):\n got %v\nwant %v", got, want)
	}
	if l[0].Allocated != 64<<10+1<<20 {
		t.Fatalf("top layer allocated %d", l[0].Allocated)
	}
}

// A parent written after the snapshot was taken changes its CID: the chain
// is refused, unless AllowStaleChain.
func TestStaleChain(t *testing.T) {
	dir := t.TempDir()
	base, s1, _ := makeChain(t, dir)
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0x77 30M 64k", base)
	_, err := openPath(t, s1, Options{})
	if err == nil || !strings.Contains(err.Error(), "stale snapshot chain") || !strings.Contains(err.Error(), "s1.vmdk") {
		t.Fatalf("stale chain: err = %v", err)
	}
	c := mustOpen(t, s1, Options{AllowStaleChain: true})
	// The child's data over the parent's new data.
	want := qemuRaw(t, base)
	wb, err := os.ReadFile(want)
	if err != nil {
		t.Fatal(err)
	}
	copy(wb[1<<20:3<<20], bytes.Repeat([]byte{0x55}, 2<<20))
	copy(wb[9437696:9437696+4608], bytes.Repeat([]byte{0x56}, 4608))
	copy(wb[60<<20:60<<20+64<<10], bytes.Repeat([]byte{0x57}, 64<<10))
	if wb[30<<20] != 0x77 {
		t.Fatal("test setup: base write missing")
	}
	randomReads(t, c, wb)
	got := make([]byte, len(wb))
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, wb) {
		t.Fatal("stale chain reads differ from the child's writes over the new parent")
	}
}

// Absolute ESXi parent paths fall back to the base name next to the child
// (qemu fails on them); an explicit parent overrides the hint.
func TestParentHintFallbackAndOverride(t *testing.T) {
	dir := t.TempDir()
	_, _, s2 := makeChain(t, dir)
	want := qemuRaw(t, s2) // before the hint is rewritten
	desc, err := os.ReadFile(s2)
	if err != nil {
		t.Fatal(err)
	}
	rewrite := func(hint string) {
		b := bytes.Replace(desc, []byte(`parentFileNameHint="s1.vmdk"`), []byte(`parentFileNameHint="`+hint+`"`), 1)
		if bytes.Equal(b, desc) {
			t.Fatal("test setup: hint not found")
		}
		writeFile(t, s2, b)
	}
	rewrite("/vmfs/volumes/5f1e0000-datastore1/vm/s1.vmdk")
	c := mustOpen(t, s2, Options{})
	sameBytes(t, c, want)
	if c.Layers()[0].Parent != "/vmfs/volumes/5f1e0000-datastore1/vm/s1.vmdk" {
		t.Fatalf("layer parent %q", c.Layers()[0].Parent)
	}
	rewrite("gone.vmdk")
	if _, err := openPath(t, s2, Options{}); err == nil || !strings.Contains(err.Error(), "gone.vmdk") {
		t.Fatalf("missing parent: err = %v", err)
	}
	c = mustOpen(t, s2, Options{Parent: "s1.vmdk"})
	sameBytes(t, c, want)
}

// Through a sources.Registry as the CLI builds it: probing picks vmdk
// before raw, and Info describes the chain.
func TestRegistry(t *testing.T) {
	dir := t.TempDir()
	_, _, s2 := makeChain(t, dir)
	r := sources.NewRegistry().AddTransport(file.Transport{}).AddFormat(Format{}).AddFormat(raw.Format{})
	for _, p := range []string{s2, filepath.Join(dir, "s1.vmdk")} {
		img, err := r.Open(t.Context(), p, sources.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if img.Info.Format != "vmdk" || len(img.Info.Layers) < 2 {
			t.Fatalf("%s: info %+v", p, img.Info)
		}
		img.Close()
	}
}

// A streamOptimized delta (qemu writes its grains in order, compressed)
// over a monolithicSparse base.
func TestQemuStreamChild(t *testing.T) {
	dir := t.TempDir()
	convertTo(t, dir, "monolithicSparse")
	child := filepath.Join(dir, "child.vmdk")
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", "-b", "disk.vmdk", "-F", "vmdk", child)
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0x31 1M 128k", "-c", "write -P 0x32 5M 1M", "-c", "write -P 0x33 40M 64k", child)
	c := checkOracle(t, child, Options{})
	if got := block.Sum(mustLayerExtents(t, c, 0), block.Data); got != 128<<10+1<<20+64<<10 {
		t.Fatalf("stream delta holds %d data bytes", got)
	}
}
