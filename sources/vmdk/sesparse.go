package vmdk

import (
	"fmt"

	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// seSparse grain table entry types (top nibble).
const (
	seUnalloc  = 0x0
	seUnmapped = 0x1 // the guest discarded the grain: zeros, no fall-through
	seZero     = 0x2
	seAlloc    = 0x3
)

// newSESparseExtent opens a seSparse extent (ESXi 5.5+/VMFS6 snapshots).
// Unmapped grains read as zeros and mask the parent, as in qemu: the guest
// discarded them after the snapshot was taken, so the parent's old bytes
// are no longer the disk's.
func newSESparseExtent(f sources.File, name string) (*grainTable, *SESparseHeader, error) {
	var b [512]byte
	if err := readFull(f, name, b[:], 0); err != nil {
		return nil, nil, err
	}
	h, err := ParseSESparseHeader(b[:])
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", name, err)
	}
	vo := int64(h.VolatileHeader[0]) * 512
	if err := readFull(f, name, b[:], vo); err != nil {
		return nil, nil, fmt.Errorf("%s: seSparse volatile header: %w", name, err)
	}
	if _, err := ParseSESparseVolatile(b[:]); err != nil {
		return nil, nil, fmt.Errorf("%s: at offset %d: %w", name, vo, err)
	}
	t := &grainTable{
		name: name, f: f, fsize: f.Size(),
		grain:   int64(h.GrainSize) * 512,
		perGT:   int64(h.GrainTableSize) * 512 / 8,
		covered: int64(h.Capacity) * 512,
	}
	t.init()
	need := (t.covered + t.grain*t.perGT - 1) / (t.grain * t.perGT)
	if have := int64(h.GrainDir[1]) * 512 / 8; need > have {
		return nil, nil, fmt.Errorf("%s: seSparse header: grain directory has %d entries, %d needed for capacity %d sectors", name, have, need, h.Capacity)
	}
	gd, err := t.readTable("grain directory", 0, int64(h.GrainDir[0])*512, need, 8)
	if err != nil {
		return nil, nil, err
	}
	nGT := h.GrainTables[1] / h.GrainTableSize
	t.gtLoc = make([]int64, need)
	for i, e := range gd {
		t.gtLoc[i] = -1
		if e == 0 {
			continue
		}
		if e>>60 != 1 {
			return nil, nil, fmt.Errorf("%s: seSparse grain directory entry %d is %#x: unknown type %d", name, i, e, e>>60)
		}
		idx := e & 0xffffffff
		if idx >= nGT {
			return nil, nil, fmt.Errorf("%s: seSparse grain directory entry %d names grain table %d, but the grain table region holds %d", name, i, idx, nGT)
		}
		t.gtLoc[i] = int64(h.GrainTables[0]+idx*h.GrainTableSize) * 512
	}
	if err := t.checkBudget(8); err != nil {
		return nil, nil, err
	}
	nGrains := h.Grains[1] / h.GrainSize
	t.entrySize = 8
	t.decode = func(i int, raw []uint64) ([]int64, error) {
		out := make([]int64, len(raw))
		for j, e := range raw {
			switch e >> 60 {
			case seUnalloc:
				if e != 0 {
					return nil, fmt.Errorf("%s: seSparse grain table %d entry %d is %#x: unallocated with non-zero bits", name, i, j, e)
				}
				out[j] = entHole
			case seUnmapped, seZero:
				out[j] = entZero
			case seAlloc:
				idx := (e&0x0fff000000000000)>>48 | (e&0x0000ffffffffffff)<<12
				if idx >= nGrains {
					return nil, fmt.Errorf("%s: seSparse grain table %d entry %d names grain %d, but the grain region holds %d", name, i, j, idx, nGrains)
				}
				out[j] = int64(h.Grains[0]+idx*h.GrainSize) * 512
			default:
				return nil, fmt.Errorf("%s: seSparse grain table %d entry %d is %#x: unknown type %d", name, i, j, e, e>>60)
			}
		}
		return out, nil
	}
	return t, h, nil
}
