package vmdk

// Where qemu is no oracle (notes/VMDK-FORMATS.md §1), the expected bytes are
// built by the test.

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

func readAll(t *testing.T, d block.Device) []byte {
	t.Helper()
	b := make([]byte, d.Size())
	if n, err := d.ReadAt(b, 0); n != len(b) {
		t.Fatalf("ReadAt: %d, %v", n, err)
	}
	return b
}

// ZERO extents keep their size (qemu drops them and shifts what follows);
// RDONLY and NOACCESS extents are part of the disk; FLAT offsets, CRLF line
// ends and file names with spaces and quotes are honoured.
func TestDescriptorQuirks(t *testing.T) {
	dir := t.TempDir()
	a, b := pattern(1<<20, 1), pattern(2<<20, 2)
	writeFile(t, filepath.Join(dir, "a.raw"), a)
	writeFile(t, filepath.Join(dir, `my "odd" disk.raw`), b)
	desc := strings.ReplaceAll(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW 2048 FLAT "a.raw" 0
RW 2048 ZERO
RDONLY 1024 FLAT "my "odd" disk.raw" 2048
NOACCESS 1024 FLAT "my "odd" disk.raw" 0

#DDB
ddb.adapterType = "ide"
`, "\n", "\r\n")
	p := filepath.Join(dir, "quirks.vmdk")
	writeFile(t, p, []byte(desc))
	c := mustOpen(t, p, Options{})
	want := append(append(append(append([]byte{}, a...), make([]byte, 1<<20)...), b[1<<20:3<<19]...), b[:1<<19]...)
	if c.Size() != int64(len(want)) {
		t.Fatalf("size %d, want %d", c.Size(), len(want))
	}
	if !bytes.Equal(readAll(t, c), want) {
		t.Fatal("bytes differ from the extents laid end to end")
	}
	randomReads(t, c, want)
	exts := allExtents(t, c)
	if z := block.Clip(exts, 1<<20, 1<<20); len(z) != 1 || z[0].Type != block.Zero {
		t.Fatalf("ZERO extent maps as %v", z)
	}
	if c.Info().Props["adapter_type"] != "ide" {
		t.Fatalf("props %v", c.Info().Props)
	}
}

// A COWD grain table entry of 1 reads as zeros and masks the parent (qemu
// would return header bytes from sector 1).
func TestCOWDZeroedGrainMasksParent(t *testing.T) {
	dir := t.TempDir()
	const size = 4 << 20
	base := pattern(size, 4)
	writeVMFSBase(t, dir, "base", base, 0x10)
	writeCOWD(t, filepath.Join(dir, "d-delta.vmdk"), size/512, map[uint32]cowdGrain{
		7: nil, 8: nil, 9: pattern(512, 1), 5000: nil,
	})
	writeDeltaDescriptor(t, filepath.Join(dir, "d.vmdk"), "vmfsSparse", "VMFSSPARSE", "d-delta.vmdk", "base.vmdk", size/512, 0x20, 0x10)
	c := mustOpen(t, filepath.Join(dir, "d.vmdk"), Options{})
	want := append([]byte{}, base...)
	clear(want[7*512 : 9*512])
	copy(want[9*512:], pattern(512, 1))
	clear(want[5000*512 : 5001*512])
	if !bytes.Equal(readAll(t, c), want) {
		t.Fatal("bytes differ")
	}
	if e := mustLayerExtents(t, c, 0); fmt.Sprint(block.Clip(e, 7*512, 3*512)) != fmt.Sprint([]block.Extent{{Off: 7 * 512, Len: 1024, Type: block.Zero}, {Off: 9 * 512, Len: 512, Type: block.Data}}) {
		t.Fatalf("map %v", block.Clip(e, 7*512, 3*512))
	}
}

// seSparse unmapped grains read as zeros and do not fall through.
func TestSESparseUnmappedMasksParent(t *testing.T) {
	dir := t.TempDir()
	const size = 20 << 20
	base := pattern(size, 8)
	writeVMFSBase(t, dir, "base", base, 0x10)
	writeSESparse(t, filepath.Join(dir, "d-sesparse.vmdk"), size/512, map[uint64]seGrain{
		3: {typ: seUnmapped}, 4: {typ: seZero}, 5: {typ: seAlloc, data: pattern(4096, 9)},
	}, false)
	writeDeltaDescriptor(t, filepath.Join(dir, "d.vmdk"), "seSparse", "SESPARSE", "d-sesparse.vmdk", "base.vmdk", size/512, 0x20, 0x10)
	c := mustOpen(t, filepath.Join(dir, "d.vmdk"), Options{})
	want := append([]byte{}, base...)
	clear(want[3*4096 : 5*4096])
	copy(want[5*4096:], pattern(4096, 9))
	if !bytes.Equal(readAll(t, c), want) {
		t.Fatal("bytes differ")
	}
	if z := block.Clip(allExtents(t, c), 3*4096, 2*4096); len(z) != 1 || z[0].Type != block.Zero {
		t.Fatalf("unmapped and zero grains map as %v", z)
	}
}

func TestRefused(t *testing.T) {
	dir := t.TempDir()
	w := func(name, s string) string {
		p := filepath.Join(dir, name)
		writeFile(t, p, []byte(s))
		return p
	}
	writeFile(t, filepath.Join(dir, "flat.raw"), make([]byte, 1<<20))
	writeSESparse(t, filepath.Join(dir, "dirty-sesparse.vmdk"), 2048, map[uint64]seGrain{1: {typ: seZero}}, true)
	hdr := "# Disk DescriptorFile\nversion=1\nCID=00000001\n"
	cases := []struct {
		name, desc string
		want       []string
	}{
		{"rdm.vmdk", hdr + "createType=\"vmfsRawDeviceMap\"\nRW 2048 VMFSRDM \"rdm-rdm.vmdk\"\n", []string{"rdm.vmdk", "raw device mapping cannot be read from a file"}},
		{"raw.vmdk", hdr + "createType=\"vmfsPassthroughRawDeviceMap\"\nRW 2048 VMFSRAW \"x-rdmp.vmdk\"\n", []string{"raw device mapping cannot be read from a file"}},
		{"cyc1.vmdk", hdr + "parentCID=00000001\ncreateType=\"monolithicFlat\"\nparentFileNameHint=\"cyc2.vmdk\"\nRW 2048 FLAT \"flat.raw\" 0\n", []string{"cycle"}},
		{"dirty.vmdk", hdr + "createType=\"seSparse\"\nRW 2048 SESPARSE \"dirty-sesparse.vmdk\"\n", []string{"dirty-sesparse.vmdk", "replay_journal", "dirty"}},
		{"badcid.vmdk", "CID=xyz\ncreateType=\"vmfs\"\n", []string{"badcid.vmdk", "line 1", "CID"}},
		{"badext.vmdk", hdr + "createType=\"vmfs\"\nRW many VMFS \"flat.raw\"\n", []string{"badext.vmdk", "line 5", "extent size"}},
		{"noext.vmdk", hdr + "createType=\"vmfs\"\n", []string{"noext.vmdk", "no extents"}},
	}
	w("cyc2.vmdk", hdr+"parentCID=00000001\ncreateType=\"monolithicFlat\"\nparentFileNameHint=\"cyc1.vmdk\"\nRW 2048 FLAT \"flat.raw\" 0\n")
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := openPath(t, w(tc.name, tc.desc), Options{})
			if err == nil {
				t.Fatal("opened")
			}
			for _, s := range tc.want {
				if !strings.Contains(err.Error(), s) {
					t.Fatalf("error %q does not mention %q", err, s)
				}
			}
		})
	}
}

// A chain deeper than MaxChainDepth is refused.
func TestChainTooDeep(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "flat.raw"), make([]byte, 4096))
	for i := 0; i <= MaxChainDepth+1; i++ {
		parent := ""
		if i <= MaxChainDepth {
			parent = fmt.Sprintf("parentFileNameHint=\"l%d.vmdk\"\nparentCID=00000001\n", i+1)
		}
		writeFile(t, filepath.Join(dir, fmt.Sprintf("l%d.vmdk", i)), []byte("CID=00000001\ncreateType=\"monolithicFlat\"\n"+parent+"RW 8 FLAT \"flat.raw\" 0\n"))
	}
	_, err := openPath(t, filepath.Join(dir, "l0.vmdk"), Options{})
	if err == nil || !strings.Contains(err.Error(), "deeper than 255") {
		t.Fatalf("err = %v", err)
	}
	// 255 layers open.
	os.Remove(filepath.Join(dir, fmt.Sprintf("l%d.vmdk", MaxChainDepth+1)))
	writeFile(t, filepath.Join(dir, fmt.Sprintf("l%d.vmdk", MaxChainDepth)), []byte("CID=00000001\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"flat.raw\" 0\n"))
	c := mustOpen(t, filepath.Join(dir, "l1.vmdk"), Options{})
	if len(c.Layers()) != MaxChainDepth {
		t.Fatalf("%d layers", len(c.Layers()))
	}
}

// ESXi thin disks (createType vmfsThin, which qemu refuses) are a VMFS
// extent over a sparse file: its holes are Holes. A windows-1252
// descriptor's file names are decoded.
func TestThinVMFSAndWindows1252(t *testing.T) {
	dir := t.TempDir()
	const size = 8 << 20
	f, err := os.Create(filepath.Join(dir, "café-flat.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	data := pattern(1<<20, 3)
	if _, err := f.WriteAt(data, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	desc := []byte("# Disk DescriptorFile\nversion=1\nencoding=\"windows-1252\"\nCID=00000007\nparentCID=ffffffff\ncreateType=\"vmfsThin\"\nRW 16384 VMFS \"caf\xe9-flat.vmdk\"\nddb.thinProvisioned = \"1\"\n")
	p := filepath.Join(dir, "thin.vmdk")
	writeFile(t, p, desc)
	c := mustOpen(t, p, Options{})
	want := make([]byte, size)
	copy(want[4<<20:], data)
	if !bytes.Equal(readAll(t, c), want) {
		t.Fatal("bytes differ")
	}
	exts := allExtents(t, c)
	if block.Sum(exts, block.Data) != 1<<20 || block.Sum(exts, block.Hole) != size-1<<20 {
		t.Fatalf("thin file maps as %v", exts)
	}
	if c.Layers()[0].Allocated != 1<<20 || c.Info().Props["thin_provisioned"] != "1" {
		t.Fatalf("layer %+v", c.Layers()[0])
	}
}
