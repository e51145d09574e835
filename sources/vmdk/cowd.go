package vmdk

import (
	"fmt"

	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// newCOWDExtent opens an ESX vmfsSparse redo log ("COWD").
//
// A grain table entry of 1 is read as a zeroed grain that masks the parent.
// qemu has no zeroed-grain notion for COWD and would read sector 1, but
// sector 1 lies inside the 2048-byte COWD header, so it can never hold a
// grain: qemu's reading returns header bytes as guest data, which is wrong
// whatever the writer meant. Xen Orchestra's ESXi reader (VhdEsxiCowd.mjs)
// treats 1 as an "emptied" grain that reads as zeros without falling
// through, which matches the zeroed-grain GTE of hosted sparse extents; we
// follow it.
func newCOWDExtent(f sources.File, name string) (*grainTable, *COWDHeader, error) {
	b := make([]byte, 2048)
	if err := readFull(f, name, b, 0); err != nil {
		return nil, nil, err
	}
	h, err := ParseCOWDHeader(b)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", name, err)
	}
	t := &grainTable{
		name: name, f: f, fsize: f.Size(),
		grain:   int64(h.GrainSize) * 512,
		perGT:   cowdGTEntries,
		covered: int64(h.Capacity) * 512,
	}
	t.init()
	n := (t.covered + t.grain*t.perGT - 1) / (t.grain * t.perGT)
	gd, err := t.readTable("grain directory", 0, int64(h.GDOffset)*512, n, 4)
	if err != nil {
		return nil, nil, err
	}
	t.gtLoc = make([]int64, n)
	for i, e := range gd {
		t.gtLoc[i] = -1
		if e != 0 {
			t.gtLoc[i] = int64(e) * 512
		}
	}
	if err := t.checkBudget(4); err != nil {
		return nil, nil, err
	}
	t.entrySize = 4
	t.decode = func(i int, raw []uint64) ([]int64, error) {
		out := make([]int64, len(raw))
		for j, e := range raw {
			switch e {
			case 0:
				out[j] = entHole
			case 1:
				out[j] = entZero // see the function comment
			default:
				out[j] = int64(e) * 512
			}
		}
		return out, nil
	}
	return t, h, nil
}
