package vmdk

import (
	"encoding/binary"
	"fmt"

	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// Stream metadata marker types (a full sector: {u64 numSectors, u32 0, u32 type}).
const (
	markerEOS      = 0
	markerGT       = 1
	markerGD       = 2
	markerFooter   = 3
	markerProgress = 4 // open-vmdk only; skipped
)

// readSparseHeader reads and checks the header of a hosted sparse extent.
// When the header defers the grain directory to the footer (GD_AT_END, as
// stream writers do), the footer's copy of the header is returned instead,
// as qemu and VMware do.
func readSparseHeader(f sources.File, name string) (*SparseHeader, error) {
	var b [512]byte
	if err := readFull(f, name, b[:], 0); err != nil {
		return nil, err
	}
	h, err := ParseSparseHeader(b[:])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if h.GDOffset != gdAtEnd {
		return h, nil
	}
	fsize := f.Size()
	if fsize < 4*512 {
		return nil, fmt.Errorf("%s: sparse header: field gdOffset says the grain directory is given by the footer, but the file (%d bytes) is too short for one", name, fsize)
	}
	var tail [1536]byte
	if err := readFull(f, name, tail[:], fsize-1536); err != nil {
		return nil, err
	}
	if typ := binary.LittleEndian.Uint32(tail[12:]); typ != markerFooter {
		return nil, fmt.Errorf("%s: footer marker at offset %d has type %d, want %d (footer)", name, fsize-1536, typ, markerFooter)
	}
	foot, err := ParseSparseHeader(tail[512:1024])
	if err != nil {
		return nil, fmt.Errorf("%s: footer at offset %d: %w", name, fsize-1024, err)
	}
	if foot.GDOffset == gdAtEnd {
		return nil, fmt.Errorf("%s: footer at offset %d: field gdOffset is also GD_AT_END", name, fsize-1024)
	}
	// Descriptor placement is taken from the header itself.
	foot.DescriptorOffset, foot.DescriptorSize = h.DescriptorOffset, h.DescriptorSize
	return foot, nil
}

// readEmbeddedDescriptor returns the descriptor text of a hosted sparse
// extent, or nil when it has none.
func readEmbeddedDescriptor(f sources.File, name string, h *SparseHeader) ([]byte, error) {
	if h.DescriptorOffset == 0 || h.DescriptorSize == 0 {
		return nil, nil
	}
	off, n := int64(h.DescriptorOffset)*512, int64(h.DescriptorSize)*512
	if off > f.Size() {
		return nil, fmt.Errorf("%s: sparse header: field descriptorOffset (offset 28) points at %d, beyond the end of the file (%d bytes)", name, off, f.Size())
	}
	n = min(n, f.Size()-off)
	b := make([]byte, n)
	if err := readFull(f, name, b, off); err != nil {
		return nil, err
	}
	return b, nil
}

// newSparseExtent opens the grain directory of a hosted sparse extent.
func newSparseExtent(f sources.File, name string, h *SparseHeader) (*grainTable, error) {
	t := &grainTable{
		name: name, f: f, fsize: f.Size(),
		grain:      int64(h.GrainSize) * 512,
		perGT:      int64(h.NumGTEsPerGT),
		covered:    int64(h.Capacity) * 512,
		compressed: h.Compressed(),
		markers:    h.Markers(),
	}
	t.init()
	n := int64(h.gdEntries())
	gdOff := int64(h.GDOffset) * 512
	if h.GDOffset == 0 && n > 0 {
		return nil, fmt.Errorf("%s: sparse header: field gdOffset (offset 56) is 0", name)
	}
	// readTable bounds n by the file size before allocating: a header that
	// claims an enormous capacity fails here.
	gd, err := t.readTable("grain directory", 0, gdOff, n, 4)
	if err != nil {
		return nil, fmt.Errorf("%w (capacity %d sectors, grain %d sectors, %d entries per table)", err, h.Capacity, h.GrainSize, h.NumGTEsPerGT)
	}
	t.gtLoc = make([]int64, n)
	for i, e := range gd {
		if e == 0 {
			t.gtLoc[i] = -1
			continue
		}
		t.gtLoc[i] = int64(e) * 512
		if t.gtLoc[i] >= t.fsize {
			return nil, fmt.Errorf("%s: grain directory entry %d points at offset %d, beyond the end of the file (%d bytes)", name, i, t.gtLoc[i], t.fsize)
		}
	}
	if err := t.checkBudget(4); err != nil {
		return nil, err
	}
	zeroed := h.Flags&flagZeroedGTE != 0
	t.entrySize = 4
	t.decode = func(i int, raw []uint64) ([]int64, error) {
		out := make([]int64, len(raw))
		for j, e := range raw {
			switch {
			case e == 0:
				out[j] = entHole
			case e == 1 && zeroed:
				out[j] = entZero
			default:
				out[j] = int64(e) * 512
			}
		}
		return out, nil
	}
	return t, nil
}
