package vmdk

// Generators for the formats qemu reads but cannot write (COWD/vmfsSparse,
// seSparse), written from the format description (notes/VMDK-FORMATS.md,
// qemu's VMDK3Header and VMDKSESparseConstHeader), in the layouts ESXi uses.

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// pattern returns deterministic content with some all-zero 4 KiB blocks.
func pattern(size int64, seed byte) []byte {
	b := make([]byte, size)
	for i := range b {
		blk := int64(i) / 4096
		if blk%7 == 3 {
			continue
		}
		b[i] = byte(int64(i)*31/7) ^ seed ^ byte(blk)
	}
	return b
}

func writeFile(t testing.TB, p string, b []byte) {
	t.Helper()
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// writeVMFSBase writes an ESXi thick disk: name.vmdk (createType vmfs) and
// name-flat.vmdk holding content.
func writeVMFSBase(t testing.TB, dir, name string, content []byte, cid uint32) {
	t.Helper()
	writeFile(t, filepath.Join(dir, name+"-flat.vmdk"), content)
	writeFile(t, filepath.Join(dir, name+".vmdk"), fmt.Appendf(nil, `# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=%08x
parentCID=ffffffff
createType="vmfs"

# Extent description
RW %d VMFS "%s-flat.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.virtualHWVersion = "14"
`, cid, len(content)/512, name))
}

// writeDeltaDescriptor writes a delta descriptor naming its extent and parent.
func writeDeltaDescriptor(t testing.TB, p, createType, extType, extent, parent string, sectors int64, cid, parentCID uint32) {
	t.Helper()
	writeFile(t, p, fmt.Appendf(nil, `# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=%08x
parentCID=%08x
createType="%s"
parentFileNameHint="%s"
# Extent description
RW %d %s "%s"

# The Disk Data Base
#DDB

ddb.longContentID = "00000000000000000000000%08x"
`, cid, parentCID, createType, parent, sectors, extType, extent, cid))
}

// cowdGrain is one allocated grain of a generated COWD extent: data, or
// nil for a grain table entry of 1.
type cowdGrain []byte

// writeCOWD writes an ESXi-style COWD redo log with 1-sector grains:
// header (4 sectors), GD at sector 4, one 4096-entry GT for each 2 MiB that
// has grains, then the grains in sector order.
func writeCOWD(t testing.TB, p string, capacity uint32, grains map[uint32]cowdGrain) {
	t.Helper()
	const perGT = 4096
	nGD := (capacity + perGT - 1) / perGT
	gdSectors := (nGD*4 + 511) / 512
	next := 4 + gdSectors
	gtSector := map[uint32]uint32{}
	var secs []uint32
	for s := range grains {
		secs = append(secs, s)
	}
	sort.Slice(secs, func(i, j int) bool { return secs[i] < secs[j] })
	for _, s := range secs {
		if _, ok := gtSector[s/perGT]; !ok {
			gtSector[s/perGT] = 0
		}
	}
	var gts []uint32
	for g := range gtSector {
		gts = append(gts, g)
	}
	sort.Slice(gts, func(i, j int) bool { return gts[i] < gts[j] })
	for _, g := range gts {
		gtSector[g] = next
		next += perGT * 4 / 512
	}
	grainAt := map[uint32]uint32{}
	for _, s := range secs {
		if grains[s] != nil {
			grainAt[s] = next
			next++
		}
	}
	b := make([]byte, int64(next)*512)
	le := binary.LittleEndian
	copy(b, "COWD")
	le.PutUint32(b[4:], 1)         // version
	le.PutUint32(b[8:], 3)         // flags
	le.PutUint32(b[12:], capacity) // sectors
	le.PutUint32(b[16:], 1)        // grainSize
	le.PutUint32(b[20:], 4)        // gdOffset
	le.PutUint32(b[24:], nGD)
	le.PutUint32(b[28:], next)
	copy(b[32:], "base.vmdk") // parentFileName
	for g, sec := range gtSector {
		le.PutUint32(b[4*512+4*g:], sec)
	}
	for _, s := range secs {
		gt := int64(gtSector[s/perGT]) * 512
		if grains[s] == nil {
			le.PutUint32(b[gt+4*int64(s%perGT):], 1)
			continue
		}
		le.PutUint32(b[gt+4*int64(s%perGT):], grainAt[s])
		copy(b[int64(grainAt[s])*512:], grains[s])
	}
	writeFile(t, p, b)
}

// seGrain is one grain (4 KiB) of a generated seSparse extent.
type seGrain struct {
	typ  uint64 // seUnmapped, seZero or seAlloc
	data []byte // seAlloc
	// journalDirty makes the volatile header ask for a journal replay.
}

// writeSESparse writes a seSparse extent laid out as ESXi does (const
// header, volatile header, journal, GD, GTs, bitmap, backmap, grains),
// with the regions shrunk to what the test needs.
func writeSESparse(t testing.TB, p string, capacity uint64, grains map[uint64]seGrain, dirty bool) {
	t.Helper()
	const perGT = 4096
	nGD := (capacity/8 + perGT - 1) / perGT
	gdOff, gdSize := uint64(8), (nGD*8+511)/512
	var idx []uint64
	for g := range grains {
		idx = append(idx, g)
	}
	sort.Slice(idx, func(i, j int) bool { return idx[i] < idx[j] })
	gtIndex := map[uint64]uint64{}
	for _, g := range idx {
		if _, ok := gtIndex[g/perGT]; !ok {
			gtIndex[g/perGT] = uint64(len(gtIndex))
		}
	}
	gtOff := gdOff + gdSize
	gtSize := uint64(len(gtIndex)) * 64
	bmOff := gtOff + gtSize
	bkOff := bmOff + 1
	grOff := bkOff + 1
	var nAlloc uint64
	for _, g := range idx {
		if grains[g].typ == seAlloc {
			nAlloc++
		}
	}
	total := grOff + nAlloc*8
	b := make([]byte, total*512)
	le := binary.LittleEndian
	u := func(i int, v uint64) { le.PutUint64(b[8*i:], v) }
	u(0, magicSESparse)
	u(1, 0x200000001)
	u(2, capacity)
	u(3, 8)
	u(4, 64)
	for i, r := range [][2]uint64{{1, 1}, {2, 2}, {4, 4}, {gdOff, gdSize}, {gtOff, gtSize}, {bmOff, 1}, {bkOff, 1}, {grOff, nAlloc * 8}} {
		u(10+2*i, r[0])
		u(11+2*i, r[1])
	}
	le.PutUint64(b[512:], magicSEVolat)
	if dirty {
		le.PutUint64(b[512+24:], 1)
	}
	for gt, i := range gtIndex {
		le.PutUint64(b[gdOff*512+8*gt:], 0x1000000000000000|i)
	}
	var next uint64
	// Allocate grains in reverse order, so the file order differs from the
	// virtual order (as after random guest writes).
	for k := len(idx) - 1; k >= 0; k-- {
		g := idx[k]
		gr := grains[g]
		at := (gtOff+gtIndex[g/perGT]*64)*512 + 8*(g%perGT)
		switch gr.typ {
		case seAlloc:
			le.PutUint64(b[at:], seAlloc<<60|(next&0xfff)<<48|next>>12)
			copy(b[(grOff+next*8)*512:], gr.data)
			next++
		default:
			le.PutUint64(b[at:], gr.typ<<60)
		}
	}
	writeFile(t, p, b)
}

func TestCOWDAgainstQemu(t *testing.T) {
	dir := t.TempDir()
	const size = 8 << 20
	base := pattern(size, 1)
	writeVMFSBase(t, dir, "base", base, 0x1234abcd)
	grains := map[uint32]cowdGrain{}
	put := func(sec uint32, n int, seed byte) {
		for i := range n {
			grains[sec+uint32(i)] = pattern(512, seed+byte(i))
		}
	}
	put(10, 100, 7)  // a run inside GT 0
	put(4090, 20, 9) // a run across GT 0 / GT 1
	put(9000, 1, 11) // single grains
	put(9002, 1, 12)
	put(16383, 1, 13) // the last sector
	// GT 2 (sectors 8192..12287) has grains; GT 3 has none: GD entry 0.
	writeCOWD(t, filepath.Join(dir, "snap-delta.vmdk"), size/512, grains)
	writeDeltaDescriptor(t, filepath.Join(dir, "snap.vmdk"), "vmfsSparse", "VMFSSPARSE", "snap-delta.vmdk", "base.vmdk", size/512, 0x55667788, 0x1234abcd)

	c := checkOracle(t, filepath.Join(dir, "snap.vmdk"), Options{})
	// The delta alone: exactly the grains written.
	got, err := c.LayerExtents(t.Context(), 0, 0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	var want []block.Extent
	for s := int64(0); s < size/512; s++ {
		typ := block.Hole
		if grains[uint32(s)] != nil {
			typ = block.Data
		}
		want = block.Append(want, block.Extent{Off: s * 512, Len: 512, Type: typ})
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("LayerExtents(0):\n got %v\nwant %v", got, want)
	}
	if l := c.Layers(); len(l) != 2 || l[0].Subformat != "vmfsSparse" || l[0].ParentID != "1234abcd" || l[1].ID != "1234abcd" || l[0].Allocated != 123*512 {
		t.Fatalf("layers: %+v", l)
	}
}

func TestSESparseAgainstQemu(t *testing.T) {
	dir := t.TempDir()
	const size = 40 << 20 // three 16 MiB grain tables
	base := pattern(size, 3)
	writeVMFSBase(t, dir, "base", base, 0xabcdef01)
	grains := map[uint64]seGrain{}
	for g := uint64(5); g < 40; g++ { // a run of data
		grains[g] = seGrain{typ: seAlloc, data: pattern(4096, byte(g))}
	}
	grains[100] = seGrain{typ: seZero}     // zero grain over base data
	grains[101] = seGrain{typ: seUnmapped} // discarded grain over base data
	grains[4095] = seGrain{typ: seAlloc, data: pattern(4096, 99)}
	grains[4096] = seGrain{typ: seAlloc, data: pattern(4096, 98)} // next GT
	// The third GT (grains 8192..) stays unallocated.
	writeSESparse(t, filepath.Join(dir, "snap-sesparse.vmdk"), size/512, grains, false)
	writeDeltaDescriptor(t, filepath.Join(dir, "snap.vmdk"), "seSparse", "SESPARSE", "snap-sesparse.vmdk", "base.vmdk", size/512, 0x11, 0xabcdef01)

	c := checkOracle(t, filepath.Join(dir, "snap.vmdk"), Options{})
	got, err := c.LayerExtents(t.Context(), 0, 0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	want := []block.Extent{
		{Off: 0, Len: 5 * 4096, Type: block.Hole},
		{Off: 5 * 4096, Len: 35 * 4096, Type: block.Data},
		{Off: 40 * 4096, Len: 60 * 4096, Type: block.Hole},
		{Off: 100 * 4096, Len: 2 * 4096, Type: block.Zero},
		{Off: 102 * 4096, Len: (4095 - 102) * 4096, Type: block.Hole},
		{Off: 4095 * 4096, Len: 2 * 4096, Type: block.Data},
		{Off: 4097 * 4096, Len: size - 4097*4096, Type: block.Hole},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("LayerExtents(0):\n got %v\nwant %v", got, want)
	}
}
