package vmdk

import (
	"context"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// flatExtent is a FLAT or VMFS extent: bytes stored 1:1 in a file from an
// offset. Holes of a thin (sparse) file are reported through the file's own
// map when the transport knows it; past the end of a short file the extent
// reads as zeros, as qemu reads it.
type flatExtent struct {
	name  string
	f     sources.File
	start int64 // byte offset of the extent in the file
	size  int64
	ext   sources.Extenter
	// hole is what a file hole is: Hole at the bottom of a chain, Zero in a
	// layer that has a parent (a flat extent has no "not here" notion).
	hole block.ExtentType
}

func newFlatExtent(f sources.File, name string, start, size int64, hasParent bool) *flatExtent {
	e := &flatExtent{name: name, f: f, start: start, size: size, hole: block.Hole}
	e.ext, _ = f.(sources.Extenter)
	if hasParent {
		e.hole = block.Zero
	}
	return e
}

func (e *flatExtent) mapRange(ctx context.Context, off, n int64, segs []seg) ([]seg, error) {
	fo := e.start + off
	in := max(0, min(n, e.f.Size()-fo)) // bytes inside the file
	if in > 0 {
		if e.ext == nil {
			segs = appendSeg(segs, seg{off: off, n: in, typ: block.Data, pos: fo})
		} else {
			exts, err := e.ext.Extents(ctx, fo, in)
			if err != nil {
				return nil, err
			}
			if err := block.Check(exts, fo, in); err != nil {
				return nil, err
			}
			for _, x := range exts {
				s := seg{off: x.Off - e.start, n: x.Len, typ: x.Type, pos: x.Off}
				if x.Type == block.Hole {
					s.typ = e.hole
				}
				segs = appendSeg(segs, s)
			}
		}
	}
	if in < n {
		segs = appendSeg(segs, seg{off: off + in, n: n - in, typ: e.hole})
	}
	return segs, nil
}

func (e *flatExtent) readData(p []byte, segs []seg) error {
	o := int64(0)
	for _, s := range segs {
		if err := readFull(e.f, e.name, p[o:o+s.n], s.pos); err != nil {
			return err
		}
		o += s.n
	}
	return nil
}

func (e *flatExtent) allocated(ctx context.Context, size int64) (int64, error) {
	segs, err := e.mapRange(ctx, 0, size, nil)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, s := range segs {
		if s.typ == block.Data {
			n += s.n
		}
	}
	return n, nil
}

func (e *flatExtent) close() error { return e.f.Close() }

// zeroExtent is a ZERO extent: it stores nothing and reads as zeros. It
// keeps its place in the disk (qemu drops it and shifts later extents).
type zeroExtent struct{}

func (zeroExtent) mapRange(_ context.Context, off, n int64, segs []seg) ([]seg, error) {
	return appendSeg(segs, seg{off: off, n: n, typ: block.Zero}), nil
}

func (zeroExtent) readData([]byte, []seg) error { return nil }
func (zeroExtent) close() error                 { return nil }

func (zeroExtent) allocated(context.Context, int64) (int64, error) { return 0, nil }
