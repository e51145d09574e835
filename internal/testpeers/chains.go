package testpeers

import (
	"bytes"
	"context"
	"encoding/binary"
	"github.com/vmdk2kvm/vmdk2kvm/internal/testutil"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// Chain is a VMDK (or chain) in a fixture folder and its qemu-img oracle.
type Chain struct {
	Name string // what it exercises
	Top  string // the file to open, relative to the folder
	Raw  string // absolute path of `qemu-img convert -O raw` of Top (outside the folder)
}

// VMDKChains writes VMDK fixtures into dir, made by qemu-img/qemu-io and
// taken from the shared real samples, with their raw conversions in
// oracleDir: a monolithicSparse base with a qemu-made sparse delta, a
// monolithicFlat disk, a streamOptimized disk, an ESXi vmfs thick disk
// (descriptor + -flat) and an ESXi seSparse disk.
func VMDKChains(t testing.TB, dir, oracleDir string) []Chain {
	t.Helper()
	sh := func(args ...string) {
		t.Helper()
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	qio := func(img string, cmds ...string) {
		t.Helper()
		args := []string{"qemu-io", "-f", "vmdk"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		sh(append(args, img)...)
	}
	var out []Chain

	// monolithicSparse base, qemu-made delta on top.
	sh("qemu-img", "create", "-q", "-f", "vmdk", "base.vmdk", "8M")
	qio("base.vmdk", "write -P 0x11 0 3M", "write -P 0x33 7M 64k")
	sh("qemu-img", "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "child.vmdk")
	qio("child.vmdk", "write -P 0x22 1M 1M", "write -P 0x44 5M 300k")
	out = append(out, Chain{Name: "sparse-chain", Top: "child.vmdk"})

	sh("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "flat.vmdk", "4M")
	qio("flat.vmdk", "write -P 0x55 512k 1M")
	out = append(out, Chain{Name: "monolithicFlat", Top: "flat.vmdk"})

	src := filepath.Join(oracleDir, "stream-src.raw")
	sh("qemu-img", "create", "-q", "-f", "raw", src, "6M")
	sh("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 1M", "-c", "write -P 0x77 3M 2M", src)
	sh("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, "stream.vmdk")
	out = append(out, Chain{Name: "streamOptimized", Top: "stream.vmdk"})

	samples := SamplesDir(t)
	copySample(t, samples, "vmfs_thick.vmdk", dir)
	copySample(t, samples, "vmfs_thick-flat.vmdk.gz", dir)
	out = append(out, Chain{Name: "vmfs-thick", Top: "vmfs_thick.vmdk"})
	// An ESXi snapshot of it: the real delta descriptor with a COWD
	// (vmfsSparse) redo log written here.
	copySample(t, samples, "vmfs_thick-000001.vmdk", dir)
	writeCOWD(t, filepath.Join(dir, "vmfs_thick-000001-delta.vmdk"), 4096, "vmfs_thick.vmdk", map[uint32]byte{
		100: 0xc1, 101: 0xc1, 102: 0xc2, 2000: 0xc3, 4095: 0xc4,
	})
	out = append(out, Chain{Name: "vmfs-cowd-snapshot", Top: "vmfs_thick-000001.vmdk"})
	copySample(t, samples, "sesparse.vmdk", dir)
	copySample(t, samples, "sesparse-extent.vmdk.gz", dir)
	out = append(out, Chain{Name: "seSparse", Top: "sesparse.vmdk"})

	for i := range out {
		out[i].Raw = filepath.Join(oracleDir, out[i].Name+".raw")
		sh("qemu-img", "convert", "-O", "raw", out[i].Top, out[i].Raw)
	}
	// The COWD delta's grains show through (qemu read the redo log).
	raw, err := os.ReadFile(filepath.Join(oracleDir, "vmfs-cowd-snapshot.raw"))
	if err != nil || len(raw) != 4096*512 || raw[100*512] != 0xc1 || raw[2000*512+511] != 0xc3 || raw[4095*512] != 0xc4 {
		t.Fatalf("COWD fixture: qemu-img does not read the generated redo log as written (%v)", err)
	}
	return out
}

// SamplesDir is the folder of the project's real VMDK samples.
func SamplesDir(t testing.TB) string { return testutil.SamplesDir(t) }

// copySample copies a sample into dir, decompressing .gz.
func copySample(t testing.TB, samples, name, dir string) {
	t.Helper()
	src := filepath.Join(samples, name)
	dst := filepath.Join(dir, strings.TrimSuffix(name, ".gz"))
	var cmd *exec.Cmd
	if strings.HasSuffix(name, ".gz") {
		cmd = exec.Command("sh", "-c", `gzip -dc "$1" > "$2"`, "sh", src, dst)
	} else {
		cmd = exec.Command("cp", src, dst)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sample %s: %v\n%s", name, err, out)
	}
	_ = os.Chmod(dst, 0o644)
}

// SameAsRaw checks that a device reads like the raw file: data extents byte
// for byte, holes and zero extents as zeros there. Only data is read from
// the device, so a large sparse disk stays cheap over a network.
func SameAsRaw(t testing.TB, dev block.Device, rawPath string) {
	t.Helper()
	f, err := os.Open(rawPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	if dev.Size() != st.Size() {
		t.Fatalf("size %d, qemu-img says %d", dev.Size(), st.Size())
	}
	const chunk = 1 << 20
	got, want := make([]byte, chunk), make([]byte, chunk)
	err = block.Walk(context.Background(), dev, 0, dev.Size(), 0, func(e block.Extent) error {
		for off := e.Off; off < e.End(); off += chunk {
			n := min(chunk, e.End()-off)
			if _, err := f.ReadAt(want[:n], off); err != nil && err != io.EOF {
				t.Fatal(err)
			}
			if e.Type.ReadsZero() {
				if !block.IsZero(want[:n]) {
					t.Fatalf("%s at %d: we say %s, qemu-img reads data", rawPath, off, e.Type)
				}
				continue
			}
			if k, err := dev.ReadAt(got[:n], off); int64(k) != n || (err != nil && err != io.EOF) {
				t.Fatalf("read %d at %d: %d, %v", n, off, k, err)
			}
			if !bytes.Equal(got[:n], want[:n]) {
				t.Fatalf("bytes at %d..%d differ from qemu-img convert -O raw", off, off+n)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// writeCOWD writes an ESX redo log (COWD, vmfsSparse) of capacity sectors
// with one-sector grains, as ESXi lays it out: a 4-sector header, the grain
// directory at sector 4, a 4096-entry grain table per 2 MiB that has
// grains, then the grains; grains maps a sector to the byte it is filled
// with. Written from the format (qemu's VMDK3Header, VMDK-FORMATS.md).
func writeCOWD(t testing.TB, p string, capacity uint32, parent string, grains map[uint32]byte) {
	t.Helper()
	const perGT = 4096
	nGD := (capacity + perGT - 1) / perGT
	next := 4 + (nGD*4+511)/512
	gtAt := map[uint32]uint32{}
	sectors := make([]uint32, 0, len(grains))
	for s := range grains {
		sectors = append(sectors, s)
	}
	sort.Slice(sectors, func(i, j int) bool { return sectors[i] < sectors[j] })
	for _, s := range sectors {
		if _, ok := gtAt[s/perGT]; !ok {
			gtAt[s/perGT] = next
			next += perGT * 4 / 512
		}
	}
	grainAt := map[uint32]uint32{}
	for _, s := range sectors {
		grainAt[s] = next
		next++
	}
	b := make([]byte, int64(next)*512)
	le := binary.LittleEndian
	copy(b, "COWD")
	le.PutUint32(b[4:], 1)         // version
	le.PutUint32(b[8:], 3)         // flags
	le.PutUint32(b[12:], capacity) // sectors
	le.PutUint32(b[16:], 1)        // grain size (sectors)
	le.PutUint32(b[20:], 4)        // grain directory offset (sectors)
	le.PutUint32(b[24:], nGD)
	le.PutUint32(b[28:], next) // next free sector
	copy(b[32:], parent)
	for g, sec := range gtAt {
		le.PutUint32(b[4*512+4*g:], sec)
	}
	for _, s := range sectors {
		le.PutUint32(b[int64(gtAt[s/perGT])*512+4*int64(s%perGT):], grainAt[s])
		copy(b[int64(grainAt[s])*512:], bytes.Repeat([]byte{grains[s]}, 512))
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}
