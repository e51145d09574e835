package qcow2

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/copier"
	"github.com/vmdk2kvm/vmdk2kvm/internal/diskgen"
	"github.com/vmdk2kvm/vmdk2kvm/sinks"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// modelFile writes a model device to a raw file for qemu-img compare.
func modelFile(t testing.TB, m block.Device, path string) string {
	t.Helper()
	if err := os.WriteFile(path, readAll(t, m), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func randomData(rng *rand.Rand, n int64) []byte {
	d := make([]byte, n)
	switch rng.IntN(3) {
	case 0:
		for i := range d {
			d[i] = byte(rng.IntN(256))
		}
	case 1:
		fill := byte(rng.IntN(255) + 1)
		for i := range d {
			d[i] = fill
		}
	default:
		for i := range d {
			d[i] = byte(i % 7)
		}
	}
	return d
}

// applyRandom applies one random operation to both the image and the model.
func applyRandom(t testing.TB, rng *rand.Rand, im *Image, model *block.Memory, maxLen int64) string {
	t.Helper()
	size := model.Size()
	off := rng.Int64N(size)
	if rng.IntN(2) == 0 { // often aligned, to hit whole-cluster paths
		off &^= 4095
	}
	n := min(rng.Int64N(maxLen)+1, size-off)
	switch rng.IntN(5) {
	case 0:
		if err := im.Zero(off, n); err != nil {
			t.Fatal(err)
		}
		model.Zero(off, n)
		return fmt.Sprintf("zero %d+%d", off, n)
	case 1:
		if err := im.Trim(off, n); err != nil {
			t.Fatal(err)
		}
		model.Trim(off, n)
		return fmt.Sprintf("trim %d+%d", off, n)
	default:
		d := randomData(rng, n)
		if _, err := im.WriteAt(d, off); err != nil {
			t.Fatal(err)
		}
		model.WriteAt(d, off)
		return fmt.Sprintf("write %d+%d", off, n)
	}
}

// Random write/zero/trim/resize sequences applied to the image and to a
// plain model: after each sequence qemu-img check is clean (no errors, no
// leaks) and qemu-img compare finds the image identical to the model.
func TestUpdaterProperty(t *testing.T) {
	src := genDisk(t)
	type setup struct {
		name string
		make func(dir string) string // returns the image path
	}
	setups := []setup{
		{"qemu-4k", func(dir string) string {
			p := filepath.Join(dir, "img.qcow2")
			run(t, "qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", p, "6M")
			return p
		}},
		{"qemu-512-refcount64", func(dir string) string { // refcount table must grow
			p := filepath.Join(dir, "img.qcow2")
			run(t, "qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", p, "3M")
			return p
		}},
		{"qemu-refcount1", func(dir string) string {
			p := filepath.Join(dir, "img.qcow2")
			run(t, "qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=1", p, "4M")
			return p
		}},
		{"qemu-compressed", func(dir string) string { // rewrites of compressed clusters
			p := filepath.Join(dir, "img.qcow2")
			run(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=65536,compression_type=zstd", src, p)
			return p
		}},
		{"ours-deflate", func(dir string) string {
			p := filepath.Join(dir, "img.qcow2")
			convert(t, src, p, sinks.Options{Compress: "deflate", ClusterSize: 16384})
			return p
		}},
		{"overlay-on-raw", func(dir string) string {
			base := filepath.Join(dir, "base.raw")
			b, _ := os.ReadFile(src)
			os.WriteFile(base, b[:8<<20], 0o644)
			p := filepath.Join(dir, "img.qcow2")
			if err := CreateOverlay(p, "base.raw", "raw"); err != nil {
				t.Fatal(err)
			}
			return p
		}},
	}
	for si, s := range setups {
		t.Run(s.name, func(t *testing.T) {
			dir := t.TempDir()
			path := s.make(dir)
			model := block.NewMemory(0, 512)
			init := qemuRaw(t, path)
			model.Resize(int64(len(init)))
			model.WriteAt(init, 0)
			rng := rand.New(rand.NewPCG(uint64(si), 99))
			for seq := range 4 {
				im, err := OpenUpdate(path)
				if err != nil {
					t.Fatal(err)
				}
				var log []string
				for range 50 {
					log = append(log, applyRandom(t, rng, im, model, 300<<10))
					if rng.IntN(15) == 0 {
						if err := im.Flush(); err != nil {
							t.Fatal(err)
						}
					}
				}
				if seq == 2 {
					ns := model.Size() + (rng.Int64N(3<<20)+1)&^511
					if err := im.Resize(ns); err != nil {
						t.Fatal(err)
					}
					model.Resize(ns)
					for range 10 {
						log = append(log, applyRandom(t, rng, im, model, 300<<10))
					}
				}
				// The open image reads like the model, extents exact.
				want := readAll(t, model)
				if got := readAll(t, im); !bytes.Equal(got, want) {
					t.Fatalf("seq %d: updater reads differ at %d after %v", seq, firstDiff(got, want), log)
				}
				exts, err := im.Extents(context.Background(), 0, im.Size())
				if err != nil || block.Check(exts, 0, im.Size()) != nil {
					t.Fatalf("extents: %v", err)
				}
				for _, e := range exts {
					if e.Type.ReadsZero() && !block.IsZero(want[e.Off:e.End()]) {
						t.Fatalf("extent %+v is not zero", e)
					}
				}
				if err := im.Close(); err != nil {
					t.Fatal(err)
				}
				qemuCheck(t, path)
				if info := qemuInfo(t, path); info.VirtualSize != model.Size() {
					t.Fatalf("size %d, model %d", info.VirtualSize, model.Size())
				}
				qemuCompare(t, modelFile(t, model, filepath.Join(dir, "model.raw")), path)
			}
		})
	}
}

// A power cut at any point of the write order: writes stop reaching the
// file after N writes (data, metadata, header alike), and in two runs of
// three a random subset of the writes issued since the last fsync is lost
// too (the disk may reorder writes between barriers). `qemu-img check -r
// all` (or our own OpenUpdate, which repairs a dirty image) then leaves an
// image that qemu-img check finds clean and that holds every write flushed
// before the cut; bytes written after the last Flush read either old or new.
func TestUpdaterCrash(t *testing.T) {
	dir := t.TempDir()
	pristine := filepath.Join(dir, "pristine.qcow2")
	run(t, "qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", pristine, "2M")
	run(t, "qemu-io", "-c", "write -P 0x5c 0 1M", "-c", "write -c -P 0x17 1M 64k", pristine)
	orig, err := os.ReadFile(pristine)
	if err != nil {
		t.Fatal(err)
	}
	base := qemuRaw(t, pristine)

	// The script: intervals of disjoint 64 KiB slots, a Flush after each.
	type op struct {
		kind   int // 0 write, 1 zero, 2 trim
		off, n int64
		data   []byte
	}
	rng := rand.New(rand.NewPCG(5, 6))
	var script [][]op
	for range 6 {
		slots := rng.Perm(32)[:5]
		var iv []op
		for _, s := range slots {
			off := int64(s)*65536 + rng.Int64N(8192)
			n := rng.Int64N(60000) + 1
			o := op{kind: []int{0, 0, 0, 1, 2}[rng.IntN(5)], off: off, n: n}
			if o.kind == 0 {
				o.data = randomData(rng, n)
			}
			iv = append(iv, o)
		}
		script = append(script, iv)
	}
	apply := func(m *block.Memory, o op) {
		switch o.kind {
		case 0:
			m.WriteAt(o.data, o.off)
		case 1:
			m.Zero(o.off, o.n)
		default:
			m.Trim(o.off, o.n)
		}
	}
	// runScript runs until the cut; it returns the model at the last
	// successful Flush and the model with every op attempted.
	runScript := func(path string, cut int, reorder bool) (flushed, attempted *block.Memory, writes int, dirty bool) {
		im, err := OpenUpdate(path)
		if err != nil {
			t.Fatal(err)
		}
		im.upd.failAfter = cut
		flushed, attempted = block.NewMemory(int64(len(base)), 512), block.NewMemory(int64(len(base)), 512)
		flushed.WriteAt(base, 0)
		attempted.WriteAt(base, 0)
	loop:
		for _, iv := range script {
			for _, o := range iv {
				apply(attempted, o)
				var err error
				switch o.kind {
				case 0:
					_, err = im.WriteAt(o.data, o.off)
				case 1:
					err = im.Zero(o.off, o.n)
				default:
					err = im.Trim(o.off, o.n)
				}
				if err != nil {
					break loop
				}
			}
			if err := im.Flush(); err != nil {
				break loop
			}
			for _, o := range iv {
				apply(flushed, o)
			}
		}
		writes = im.upd.writes
		dirty = im.h.Incompatible&IncompatDirty != 0
		if reorder {
			dropUnsynced(t, im.upd, rng)
		}
		im.Close() // fails past the cut: nothing more reaches the file
		return flushed, attempted, writes, dirty
	}
	full := filepath.Join(dir, "full.qcow2")
	os.WriteFile(full, orig, 0o644)
	_, all, total, _ := runScript(full, 1<<30, false)
	qemuCheck(t, full)
	qemuCompare(t, modelFile(t, all, filepath.Join(dir, "all.raw")), full)
	if total < 50 {
		t.Fatalf("only %d writes in the script", total)
	}
	dirtySeen, leaksSeen := 0, 0
	for k := 0; k < 60; k++ {
		cut := 1 + k*total/60 + rng.IntN(max(1, total/60))
		path := filepath.Join(dir, fmt.Sprintf("cut%d.qcow2", cut))
		os.WriteFile(path, orig, 0o644)
		flushed, attempted, _, dirty := runScript(path, cut, k%3 != 0)
		if dirty {
			dirtySeen++
		}
		var out string
		if k%2 == 0 {
			out, _ = tryRun("qemu-img", "check", "-r", "all", path)
			if strings.Contains(out, "Leaked") || strings.Contains(out, "leaked") {
				leaksSeen++
			}
		} else {
			// Our own recovery: OpenUpdate repairs a dirty image.
			im, err := OpenUpdate(path)
			if err != nil {
				t.Fatalf("cut after %d of %d writes: reopening: %v", cut, total, err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
		}
		qemuCheck(t, path)
		got := qemuRaw(t, path)
		want, newer := readAll(t, flushed), readAll(t, attempted)
		for i := range got {
			if got[i] != want[i] && got[i] != newer[i] {
				t.Fatalf("cut after %d of %d writes: byte %d is %#x, flushed %#x, attempted %#x\nrepair: %s", cut, total, i, got[i], want[i], newer[i], out)
			}
		}
		os.Remove(path)
	}
	if dirtySeen == 0 {
		t.Fatalf("no cut fell inside a Flush's metadata phase (of %d writes)", total)
	}
	t.Logf("%d writes; %d cuts inside a flush (dirty bit set); %d repairs found leaks", total, dirtySeen, leaksSeen)
}

// The updater refuses what it cannot update safely, with clear errors.
func TestUpdaterRefuses(t *testing.T) {
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	run(t, "qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", p("v2.qcow2"), "1M")
	run(t, "qemu-img", "create", "-f", "qcow2", p("snap.qcow2"), "1M")
	run(t, "qemu-img", "snapshot", "-c", "s1", p("snap.qcow2"))
	run(t, "qemu-img", "create", "-f", "qcow2", p("ok.qcow2"), "1M")
	for name, want := range map[string]string{"v2.qcow2": "version 2", "snap.qcow2": "snapshots", "missing.qcow2": "no such file"} {
		if _, err := OpenUpdate(p(name)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v", name, err)
		}
	}
	// A refcount block that is the refcount table itself (a loop), and an
	// L2 table on the refcount table: refused before anything is written.
	for name, mutate := range map[string]func(b []byte, h *Header){
		"refcount-loop": func(b []byte, h *Header) {
			binary.BigEndian.PutUint64(b[h.RefcountTableOffset:], h.RefcountTableOffset)
		},
		"l2-on-refcount-table": func(b []byte, h *Header) {
			binary.BigEndian.PutUint64(b[h.L1TableOffset:], flagCopied|h.RefcountTableOffset)
		},
	} {
		b, _ := os.ReadFile(p("ok.qcow2"))
		h, err := ParseHeader(b, int64(len(b)))
		if err != nil {
			t.Fatal(err)
		}
		mutate(b, h)
		os.WriteFile(p(name+".qcow2"), b, 0o644)
		if _, err := OpenUpdate(p(name + ".qcow2")); err == nil || !strings.Contains(err.Error(), "overlaps") {
			t.Errorf("%s: %v", name, err)
		}
		after, _ := os.ReadFile(p(name + ".qcow2"))
		if !bytes.Equal(after, b) {
			t.Errorf("%s: refused image was modified", name)
		}
	}
	im, err := OpenUpdate(p("ok.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt([]byte("x"), 1<<20); err == nil {
		t.Error("write past the end accepted")
	}
	if err := im.Resize(1000); err == nil {
		t.Error("shrink accepted")
	}
	// A crash inside Flush leaves the dirty bit: OpenUpdate repairs it.
	im.upd.failAfter = 3
	im.WriteAt(bytes.Repeat([]byte{7}, 4096), 0)
	im.Close()
	if !dirty(p("ok.qcow2")) {
		t.Fatal("cut inside Flush left no dirty bit")
	}
	im, err = OpenUpdate(p("ok.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
	if dirty(p("ok.qcow2")) {
		t.Fatal("still dirty after OpenUpdate and Close")
	}
	qemuCheck(t, p("ok.qcow2"))
	ro, err := OpenFile(p("ok.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.WriteAt([]byte("x"), 0); err == nil {
		t.Error("write to a read-only image accepted")
	}
}

// Overlays: an empty overlay reads like its base; writes go to the overlay
// only; Commit puts them into the base (qcow2 or raw), which qemu-img then
// finds clean and identical to the model.
func TestOverlayAndCommit(t *testing.T) {
	src := genDisk(t)
	for _, baseFmt := range []string{"qcow2", "raw"} {
		t.Run(baseFmt, func(t *testing.T) {
			dir := t.TempDir()
			base := filepath.Join(dir, "base."+baseFmt)
			if baseFmt == "qcow2" {
				convert(t, src, base, sinks.Options{})
			} else {
				b, _ := os.ReadFile(src)
				os.WriteFile(base, b, 0o644)
			}
			ov := filepath.Join(dir, "overlay.qcow2")
			if err := CreateOverlay(ov, "base."+baseFmt, ""); err != nil {
				t.Fatal(err)
			}
			info := qemuInfo(t, ov)
			if info.BackingFile != "base."+baseFmt || info.VirtualSize != diskSize {
				t.Fatalf("qemu-img info: %+v", info)
			}
			qemuCheck(t, ov)
			qemuCompare(t, base, ov)
			before := qemuRaw(t, base)

			model := block.NewMemory(diskSize, 512)
			model.WriteAt(before, 0)
			im, err := OpenUpdate(ov)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(3, 4))
			for range 60 {
				applyRandom(t, rng, im, model, 200<<10)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheck(t, ov)
			ref := modelFile(t, model, filepath.Join(dir, "model.raw"))
			qemuCompare(t, ref, ov)
			if !bytes.Equal(qemuRaw(t, base), before) {
				t.Fatal("writing the overlay changed the base")
			}
			n, err := Commit(context.Background(), ov)
			if err != nil {
				t.Fatal(err)
			}
			if n == 0 {
				t.Fatal("nothing committed")
			}
			if baseFmt == "qcow2" {
				qemuCheck(t, base)
			}
			qemuCompare(t, ref, base)
			qemuCompare(t, ref, ov)
		})
	}
}

// dropUnsynced undoes a random subset of the writes issued since the last
// sync, newest first; bytes a later kept write covers stay as written.
func dropUnsynced(t testing.TB, u *updater, rng *rand.Rand) {
	t.Helper()
	type span struct{ s, e int64 }
	var kept []span
	for i := len(u.undo) - 1; i >= 0; i-- {
		r := u.undo[i]
		if rng.IntN(2) == 0 {
			kept = append(kept, span{r.off, r.off + int64(len(r.old))})
			continue
		}
		covered := func(pos int64) bool {
			for _, k := range kept {
				if pos >= k.s && pos < k.e {
					return true
				}
			}
			return false
		}
		for j := 0; j < len(r.old); {
			if covered(r.off + int64(j)) {
				j++
				continue
			}
			e := j + 1
			for e < len(r.old) && !covered(r.off+int64(e)) {
				e++
			}
			if _, err := u.f.WriteAt(r.old[j:e], r.off+int64(j)); err != nil {
				t.Fatal(err)
			}
			j = e
		}
	}
	u.undo = nil
}

// An incremental sync as the warm migration runs it: the copy engine writes
// a newer disk into the existing image from several goroutines, zeroing what
// became holes (TargetZeroed false); after Flush and Close the image is
// clean for qemu-img check and identical to the newer disk.
func TestUpdaterIncrementalCopy(t *testing.T) {
	dir := t.TempDir()
	v1 := genDisk(t)
	img := filepath.Join(dir, "replica.qcow2")
	convert(t, v1, img, sinks.Options{})
	v2 := filepath.Join(dir, "v2.raw")
	if _, err := diskgen.Write(context.Background(), v2, diskSize, 8); err != nil {
		t.Fatal(err)
	}
	src, err := registry().Open(context.Background(), v2, sources.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	im, err := OpenUpdate(img)
	if err != nil {
		t.Fatal(err)
	}
	st, err := copier.Copy(context.Background(), src, im, copier.Options{Workers: 4})
	if err != nil {
		t.Fatal(err)
	}
	if st.Zeroed == 0 {
		t.Fatalf("no Zero calls exercised: %+v", st)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, img)
	qemuCompare(t, v2, img)
}
