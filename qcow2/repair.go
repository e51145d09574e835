package qcow2

import (
	"encoding/binary"
	"fmt"
	"os"
)

// extBitmaps is the persistent dirty bitmaps header extension.
const extBitmaps = 0x23852875

// Repair rebuilds the refcounts of an image left dirty by a crash (the dirty
// bit set, refcounts possibly higher than the references), like qemu does
// when it opens such an image read-write: it counts every reference from the
// header, L1 and L2 tables, writes a fresh refcount table and blocks past the
// end of the file, syncs, then points the header at them and clears the
// dirty bit in one sector write. The old refcount structures become unused
// space. Images with internal snapshots or bitmaps are left to qemu-img check
// -r all. It returns how many clusters had a wrong refcount.
func Repair(path string) (int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	im, err := openImage(path, f, st.Size())
	if err != nil {
		return 0, err
	}
	h := im.h
	switch {
	case h.Version < 3:
		return 0, fmt.Errorf("%s: version 2 images have no dirty bit; use qemu-img check -r all", path)
	case h.NbSnapshots != 0:
		return 0, fmt.Errorf("%s: images with internal snapshots are repaired by qemu-img check -r all", path)
	}
	for _, e := range h.Extensions {
		if e.Type == extBitmaps {
			return 0, fmt.Errorf("%s: images with persistent bitmaps are repaired by qemu-img check -r all", path)
		}
	}
	cs := im.cs
	fileClusters := (st.Size() + cs - 1) / cs
	refs := make([]uint32, fileClusters) // bounded by the file size
	add := func(off, n int64, what string) error {
		if off < 0 || off+n > fileClusters*cs {
			return fmt.Errorf("%s: %s at %d+%d lies past the end of the file", path, what, off, n)
		}
		for c := off / cs; c <= (off+n-1)/cs; c++ {
			refs[c]++
		}
		return nil
	}
	add(0, cs, "header")
	if err := add(int64(h.L1TableOffset), max(1, int64(h.L1Size)*8), "L1 table"); err != nil {
		return 0, err
	}
	for i, l1e := range im.l1 {
		if l1e&offsetMask == 0 {
			continue
		}
		if err := add(int64(l1e&offsetMask), cs, fmt.Sprintf("L2 table %d", i)); err != nil {
			return 0, err
		}
		t, err := im.table(int64(i))
		if err != nil {
			return 0, err
		}
		for j, raw := range t.e {
			e, err := decodeL2(raw, im.cb, h.Version)
			if err != nil {
				return 0, fmt.Errorf("%s: L2 table %d entry %d: %w", path, i, j, err)
			}
			switch {
			case e.kind == kindNormal, e.kind == kindZero && e.host != 0:
				err = add(int64(e.host), cs, "data cluster")
			case e.kind == kindCompressed:
				err = add(int64(e.host), e.length, "compressed cluster")
			}
			if err != nil {
				return 0, err
			}
		}
		delete(im.l2, int64(i)) // keep the cache small
	}
	// New refcount table and blocks after everything, covering themselves.
	order := h.RefcountOrder
	perBlock := cs * 8 / int64(h.RefcountBits())
	limit := uint64(1)<<(uint64(1)<<order) - 1
	if order == 6 {
		limit = ^uint64(0)
	}
	start := fileClusters
	var rtClusters, blocks int64 = 1, 1
	for {
		total := start + rtClusters + blocks
		nb := (total + perBlock - 1) / perBlock
		nr := max(1, (nb*8+cs-1)/cs)
		if nb == blocks && nr == rtClusters {
			break
		}
		blocks, rtClusters = nb, nr
	}
	if rtClusters*cs > maxRefTableBytes {
		return 0, fmt.Errorf("%s: refcount table would exceed %d bytes", path, maxRefTableBytes)
	}
	total := start + rtClusters + blocks
	// Count how many refcounts change against the old block of the same
	// index (same refcount width, so the same clusters).
	oldRT := make([]byte, int64(h.RefcountTableClusters)*cs) // bounded by ParseHeader
	if _, err := f.ReadAt(oldRT, int64(h.RefcountTableOffset)); err != nil {
		return 0, fmt.Errorf("%s: reading refcount table: %w", path, err)
	}
	var fixed int64
	buf, oldBlk := make([]byte, cs), make([]byte, cs)
	for b := range blocks {
		clear(buf)
		clear(oldBlk)
		if 8*b+8 <= int64(len(oldRT)) {
			if off := int64(binary.BigEndian.Uint64(oldRT[8*b:]) & offsetMask); off != 0 && off+cs <= st.Size() {
				if _, err := f.ReadAt(oldBlk, off); err != nil {
					return 0, fmt.Errorf("%s: reading refcount block %d: %w", path, b, err)
				}
			}
		}
		for i := int64(0); i < perBlock && b*perBlock+i < total; i++ {
			c := b*perBlock + i
			v := uint64(1) // the new table and blocks
			if c < start {
				v = uint64(refs[c])
			}
			if v > limit {
				return 0, fmt.Errorf("%s: cluster %d has %d references, more than %d-bit refcounts hold", path, c, v, 1<<order)
			}
			setRefcount(buf, i, order, v)
			if c < start && getRefcount(oldBlk, i, order) != v {
				fixed++
			}
		}
		if _, err := f.WriteAt(buf, (start+rtClusters+b)*cs); err != nil {
			return 0, err
		}
	}
	rt := make([]byte, rtClusters*cs)
	for b := range blocks {
		binary.BigEndian.PutUint64(rt[8*b:], uint64((start+rtClusters+b)*cs))
	}
	if _, err := f.WriteAt(rt, start*cs); err != nil {
		return 0, err
	}
	if err := f.Sync(); err != nil {
		return 0, err
	}
	h.RefcountTableOffset, h.RefcountTableClusters = uint64(start*cs), uint32(rtClusters)
	h.Incompatible &^= IncompatDirty
	hb := make([]byte, 104)
	h.encodeFixed(hb)
	if _, err := f.WriteAt(hb, 0); err != nil {
		return 0, err
	}
	return fixed, f.Sync()
}
