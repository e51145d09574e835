package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"

	"golang.org/x/sys/unix"
)

// updater is the read-write state of an image opened with OpenUpdate. All of
// it is guarded by Image.mu; the write order is in the package comment.
type updater struct {
	f       *os.File
	fileEnd int64 // cluster-aligned end of everything allocated

	order    uint32
	perBlock int64 // refcount entries per block

	rt         []uint64 // refcount table
	rtOff      int64
	rtClusters int64
	rtMoved    bool // rt lives at a new place not yet written
	rtDirty    map[int64]bool
	blocks     map[int64][]byte // loaded refcount blocks
	blockDirty map[int64]bool
	frees      []int64 // clusters whose refcount drops at the next Flush

	l1Off    int64
	l1Cap    int64 // L1 entries that fit the clusters of the L1 table
	l1Moved  bool
	l1Dirty  map[int64]bool
	hdrDirty bool
	closed   bool
	// failAfter, when positive, makes the file fail every write after that
	// many writes: the tests' power cut.
	failAfter int
	writes    int
	undo      []undoRec // with failAfter: writes since the last sync
}

// undoRec is what a write replaced, for the tests' power cut.
type undoRec struct {
	off int64
	old []byte
}

// OpenUpdate opens an existing qcow2 v3 image read-write, for incremental
// syncs: WriteAt, Zero and Trim at any offset, Flush, Resize (grow) and
// Close, which flushes. Only Flush makes writes durable; see the package
// comment for what a crash leaves behind. A backing file is opened
// read-only (qcow2 or raw) and used for partial writes to unallocated
// clusters. An image marked dirty (a crash inside Flush) is first repaired
// with Repair, as qemu does; images marked corrupt, version 2 images and
// images with internal snapshots are refused.
func OpenUpdate(path string) (*Image, error) {
	if dirty(path) {
		// Like qemu: a dirty image gets its refcounts rebuilt first.
		if _, err := Repair(path); err != nil {
			return nil, fmt.Errorf("%s: repairing the refcounts of a dirty image: %w", path, err)
		}
	}
	im, f, err := openPath(path, os.O_RDWR)
	if err != nil {
		return nil, err
	}
	if err := im.startUpdate(f); err != nil {
		im.Close()
		return nil, err
	}
	if err := im.attachLocalBacking(path, nil); err != nil {
		im.Close()
		return nil, err
	}
	return im, nil
}

func (im *Image) startUpdate(f *os.File) error {
	h := im.h
	switch {
	case h.Version < 3:
		return fmt.Errorf("%s: version 2 (compat=0.10) images are opened read-only; upgrade with qemu-img amend -o compat=1.1", im.name)
	case h.Incompatible&IncompatDirty != 0:
		return fmt.Errorf("%s: image is marked dirty (not closed cleanly); repair it with qemu-img check -r all", im.name)
	case h.Incompatible&IncompatCorrupt != 0:
		return fmt.Errorf("%s: image is marked corrupt; repair it with qemu-img check -r all", im.name)
	case h.NbSnapshots != 0:
		return fmt.Errorf("%s: images with internal snapshots (%d) are not updated in place", im.name, h.NbSnapshots)
	case h.Autoclear != 0:
		// Bitmaps would go stale: clear the bits, as the spec asks of
		// writers that do not maintain them (done on first Flush).
		im.h.Autoclear = 0
	}
	for i, e := range im.l1 {
		if e&offsetMask != 0 && e&flagCopied == 0 {
			return fmt.Errorf("%s: L1 entry %d shares its L2 table (refcount > 1); not updated in place", im.name, i)
		}
	}
	u := &updater{
		f: f, fileEnd: (im.fileSize + im.cs - 1) &^ (im.cs - 1), order: h.RefcountOrder,
		perBlock: im.cs * 8 / int64(h.RefcountBits()), rtOff: int64(h.RefcountTableOffset),
		rtClusters: int64(h.RefcountTableClusters), rtDirty: map[int64]bool{},
		blocks: map[int64][]byte{}, blockDirty: map[int64]bool{}, l1Dirty: map[int64]bool{},
		l1Off: int64(h.L1TableOffset), hdrDirty: h.Autoclear != 0,
	}
	u.l1Cap = (int64(h.L1Size)*8 + im.cs - 1) / im.cs * im.cs / 8
	raw := make([]byte, u.rtClusters*im.cs) // bounded to 8 MiB by ParseHeader
	if _, err := f.ReadAt(raw, u.rtOff); err != nil {
		return fmt.Errorf("%s: reading refcount table at %d: %w", im.name, u.rtOff, err)
	}
	u.rt = make([]uint64, len(raw)/8)
	for i := range u.rt {
		u.rt[i] = binary.BigEndian.Uint64(raw[8*i:])
	}
	if err := im.checkLayout(u); err != nil {
		return err
	}
	im.upd = u
	return nil
}

// checkLayout refuses metadata that overlaps other metadata (a refcount
// block inside the refcount table, an L2 table on the header, two tables on
// one cluster, ...): writing such an image would corrupt it further.
func (im *Image) checkLayout(u *updater) error {
	owner := map[int64]string{0: "the header"}
	claim := func(off, n int64, what string) error {
		for c := off / im.cs; c < (off+n+im.cs-1)/im.cs; c++ {
			if prev, ok := owner[c]; ok {
				return fmt.Errorf("%s: %s overlaps %s at cluster offset %d; repair the image (qemu-img check -r all)", im.name, what, prev, c*im.cs)
			}
			owner[c] = what
		}
		return nil
	}
	if err := claim(u.rtOff, u.rtClusters*im.cs, "the refcount table"); err != nil {
		return err
	}
	if err := claim(u.l1Off, max(8, int64(len(im.l1))*8), "the L1 table"); err != nil {
		return err
	}
	for i, e := range u.rt {
		off := int64(e & offsetMask)
		if off == 0 {
			continue
		}
		if e&^offsetMask != 0 || off+im.cs > u.fileEnd {
			return fmt.Errorf("%s: refcount table entry %d (%#x) is malformed or past the end of the file", im.name, i, e)
		}
		if err := claim(off, im.cs, fmt.Sprintf("refcount block %d", i)); err != nil {
			return err
		}
	}
	for i, e := range im.l1 {
		if off := int64(e & offsetMask); off != 0 {
			if err := claim(off, im.cs, fmt.Sprintf("the L2 table of L1 entry %d", i)); err != nil {
				return err
			}
		}
	}
	return nil
}

// fail counts a write and reports the simulated power cut.
func (u *updater) write(p []byte, off int64) error {
	if u.failAfter > 0 {
		if u.writes >= u.failAfter {
			return errPowerCut
		}
		u.writes++
		old := make([]byte, len(p))
		u.f.ReadAt(old, off) // past the end reads as zeros
		u.undo = append(u.undo, undoRec{off, old})
	}
	_, err := u.f.WriteAt(p, off)
	return err
}

func (u *updater) sync() error {
	if u.failAfter > 0 {
		if u.writes >= u.failAfter {
			return errPowerCut
		}
		u.undo = nil
	}
	return u.f.Sync()
}

var errPowerCut = errors.New("qcow2: simulated power cut")

// dirty reports whether path is a qcow2 v3 image with the dirty bit set.
func dirty(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var b [80]byte
	if _, err := f.ReadAt(b[:], 0); err != nil {
		return false
	}
	return string(b[:4]) == Magic && binary.BigEndian.Uint32(b[4:]) == 3 && binary.BigEndian.Uint64(b[72:])&IncompatDirty != 0
}

// refBlock returns refcount block bi, creating it when create is set.
func (im *Image) refBlock(bi int64, create bool) ([]byte, error) {
	u := im.upd
	if blk, ok := u.blocks[bi]; ok {
		return blk, nil
	}
	if bi < int64(len(u.rt)) && u.rt[bi]&offsetMask != 0 {
		off := int64(u.rt[bi] & offsetMask)
		if off%im.cs != 0 || off+im.cs > u.fileEnd {
			return nil, fmt.Errorf("%s: refcount table entry %d points at %d, outside the file", im.name, bi, off)
		}
		blk := make([]byte, im.cs)
		if _, err := u.f.ReadAt(blk, off); err != nil {
			return nil, fmt.Errorf("%s: reading refcount block %d at %d: %w", im.name, bi, off, err)
		}
		u.blocks[bi] = blk
		return blk, nil
	}
	if !create {
		return nil, nil
	}
	if bi >= int64(len(u.rt)) {
		if err := im.growRefTable(bi + 1); err != nil {
			return nil, err
		}
		if blk, ok := u.blocks[bi]; ok { // created while growing
			return blk, nil
		}
	}
	off := u.fileEnd
	u.fileEnd += im.cs
	blk := make([]byte, im.cs)
	u.blocks[bi], u.blockDirty[bi] = blk, true
	u.rt[bi], u.rtDirty[bi] = uint64(off), true
	if err := im.addRef(off/im.cs, 1); err != nil {
		return nil, err
	}
	return blk, nil
}

func (im *Image) growRefTable(minEntries int64) error {
	u := im.upd
	n := max(minEntries, 2*int64(len(u.rt)))
	clusters := (n*8 + im.cs - 1) / im.cs
	if clusters*im.cs > maxRefTableBytes {
		return fmt.Errorf("%s: refcount table would exceed %d bytes", im.name, maxRefTableBytes)
	}
	oldOff, oldClusters := u.rtOff, u.rtClusters
	off := u.fileEnd
	u.fileEnd += clusters * im.cs
	u.rt = append(u.rt, make([]uint64, clusters*im.cs/8-int64(len(u.rt)))...)
	u.rtOff, u.rtClusters, u.rtMoved = off, clusters, true
	for c := range clusters {
		if err := im.addRef(off/im.cs+c, 1); err != nil {
			return err
		}
	}
	for c := range oldClusters {
		u.frees = append(u.frees, oldOff/im.cs+c)
	}
	return nil
}

// addRef changes the refcount of host cluster c by delta.
func (im *Image) addRef(c int64, delta int) error {
	u := im.upd
	bi, i := c/u.perBlock, c%u.perBlock
	blk, err := im.refBlock(bi, delta > 0)
	if err != nil {
		return err
	}
	if blk == nil {
		return fmt.Errorf("%s: refcount of cluster %d would drop below zero (no refcount block)", im.name, c)
	}
	v := getRefcount(blk, i, u.order)
	nv := int64(v) + int64(delta)
	limit := uint64(1)<<(uint64(1)<<u.order) - 1
	if u.order == 6 {
		limit = ^uint64(0)
	}
	if nv < 0 || uint64(nv) > limit {
		return fmt.Errorf("%s: refcount of host cluster %d (offset %d) would become %d", im.name, c, c*im.cs, nv)
	}
	setRefcount(blk, i, u.order, uint64(nv))
	u.blockDirty[bi] = true
	return nil
}

// alloc appends n clusters with refcount 1 and returns the first's offset.
func (im *Image) alloc(n int64) (int64, error) {
	u := im.upd
	host := u.fileEnd
	u.fileEnd += n * im.cs
	for c := range n {
		if err := im.addRef(host/im.cs+c, 1); err != nil {
			return 0, err
		}
	}
	return host, nil
}

// release queues the host clusters of an entry being replaced.
func (im *Image) release(e entry) {
	u := im.upd
	switch e.kind {
	case kindNormal:
		u.frees = append(u.frees, int64(e.host)/im.cs)
	case kindZero:
		if e.host != 0 {
			u.frees = append(u.frees, int64(e.host)/im.cs)
		}
	case kindCompressed:
		for c := int64(e.host) / im.cs; c <= (int64(e.host)+e.length-1)/im.cs; c++ {
			u.frees = append(u.frees, c)
		}
	}
}

// setEntry sets the L2 entry of guest cluster vc, creating its table.
func (im *Image) setEntry(vc int64, v uint64) error {
	per := im.cs / 8
	i := vc / per
	t, err := im.table(i)
	if err != nil {
		return err
	}
	if t == nil {
		if v == 0 {
			return nil
		}
		off, err := im.alloc(1)
		if err != nil {
			return err
		}
		t = &l2table{off: uint64(off), e: make([]uint64, per)}
		im.l2[i] = t
		im.l1[i] = uint64(off) | flagCopied
		im.upd.l1Dirty[i] = true
	}
	t.e[vc%per] = v
	t.dirty = true
	return nil
}

func (im *Image) writable() error {
	if im.upd == nil {
		return fmt.Errorf("%s: opened read-only", im.name)
	}
	if im.upd.closed {
		return fmt.Errorf("%s: closed", im.name)
	}
	return nil
}

// WriteAt implements block.Writer.
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.writable(); err != nil {
		return 0, err
	}
	if off < 0 || off+int64(len(p)) > im.size {
		return 0, fmt.Errorf("%s: write [%d,+%d) outside size %d", im.name, off, len(p), im.size)
	}
	for done := 0; done < len(p); {
		pos := off + int64(done)
		vc, in := pos/im.cs, pos%im.cs
		n := int(min(int64(len(p)-done), im.cs-in))
		if err := im.writeCluster(p[done:done+n], vc, in); err != nil {
			return done, err
		}
		done += n
	}
	return len(p), nil
}

// writeCluster writes p at offset in of guest cluster vc. mu held.
func (im *Image) writeCluster(p []byte, vc, in int64) error {
	u := im.upd
	e, err := im.lookup(vc)
	if err != nil {
		return err
	}
	if e.kind == kindNormal && e.copied {
		if err := u.write(p, int64(e.host)+in); err != nil {
			return fmt.Errorf("%s: writing guest offset %d: %w", im.name, vc*im.cs+in, err)
		}
		return nil
	}
	buf := p
	if in != 0 || int64(len(p)) != im.cs {
		buf = make([]byte, im.cs)
		if err := im.readCluster(buf, e, vc*im.cs, 0); err != nil {
			return err
		}
		copy(buf[in:], p)
	}
	host, err := im.alloc(1)
	if err != nil {
		return err
	}
	if err := u.write(buf, host); err != nil {
		return fmt.Errorf("%s: writing guest offset %d: %w", im.name, vc*im.cs+in, err)
	}
	if err := im.setEntry(vc, uint64(host)|flagCopied); err != nil {
		return err
	}
	im.release(e)
	return nil
}

// Zero implements block.Writer: whole clusters get the zero flag (and lose
// their host cluster), partial ones are written with zeros.
func (im *Image) Zero(off, length int64) error { return im.clearRange(off, length, false) }

// Trim implements block.Writable: whole clusters become unallocated (zero
// clusters when a backing file would show through), partial ones zeros.
func (im *Image) Trim(off, length int64) error { return im.clearRange(off, length, true) }

func (im *Image) clearRange(off, length int64, trim bool) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.writable(); err != nil {
		return err
	}
	if off < 0 || length < 0 || off+length > im.size {
		return fmt.Errorf("%s: zero [%d,+%d) outside size %d", im.name, off, length, im.size)
	}
	var zeros []byte
	for pos, end := off, off+length; pos < end; {
		vc, in := pos/im.cs, pos%im.cs
		n := min(end-pos, im.cs-in)
		clen := min(im.cs, im.size-vc*im.cs)
		e, err := im.lookup(vc)
		if err != nil {
			return err
		}
		readsZero := e.kind == kindZero || (e.kind == kindUnallocated && im.backing == nil)
		switch {
		case in == 0 && n >= clen:
			target := flagZero
			if trim && im.backing == nil {
				target = 0
			}
			if (target == 0 && e.kind == kindUnallocated) || (target == flagZero && e.kind == kindZero && e.host == 0) {
				break
			}
			if err := im.setEntry(vc, target); err != nil {
				return err
			}
			im.release(e)
		case readsZero:
		default:
			if zeros == nil {
				zeros = make([]byte, im.cs)
			}
			if err := im.writeCluster(zeros[:n], vc, in); err != nil {
				return err
			}
		}
		pos += n
	}
	return nil
}

// Resize grows the virtual size (shrinking is refused), rounded up to a
// multiple of 512 bytes as qemu reads only whole sectors. New space reads as
// zeros. Like every change it becomes durable with the next Flush.
func (im *Image) Resize(size int64) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.writable(); err != nil {
		return err
	}
	if size < im.size {
		return fmt.Errorf("%s: shrinking from %d to %d bytes is not supported", im.name, im.size, size)
	}
	size = (size + 511) &^ 511 // qemu sees whole sectors only
	u := im.upd
	need := int64(l1Needed(uint64(size), im.cb))
	if need*8 > maxL1Bytes {
		return fmt.Errorf("%s: size %d needs an L1 table over 32 MiB", im.name, size)
	}
	if need > u.l1Cap {
		clusters := (need*8 + im.cs - 1) / im.cs
		off, err := im.alloc(clusters)
		if err != nil {
			return err
		}
		oldClusters := (u.l1Cap*8 + im.cs - 1) / im.cs
		for c := range oldClusters {
			u.frees = append(u.frees, u.l1Off/im.cs+c)
		}
		u.l1Off, u.l1Cap, u.l1Moved = off, clusters*im.cs/8, true
	}
	for i := int64(len(im.l1)); i < need; i++ {
		im.l1 = append(im.l1, 0)
		u.l1Dirty[i] = true
	}
	im.size = size
	im.h.Size = uint64(size)
	im.h.L1Size = uint32(len(im.l1))
	u.hdrDirty = true
	return nil
}

// Flush implements block.Writer: everything written so far becomes
// durable, in the crash-safe order of the package comment.
func (im *Image) Flush() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := im.writable(); err != nil {
		return err
	}
	return im.flush()
}

func (im *Image) dirtyMeta() bool {
	u := im.upd
	if u.hdrDirty || u.rtMoved || u.l1Moved || len(u.frees) > 0 || len(u.blockDirty) > 0 || len(u.l1Dirty) > 0 || len(u.rtDirty) > 0 {
		return true
	}
	for _, t := range im.l2 {
		if t.dirty {
			return true
		}
	}
	return false
}

func (im *Image) flush() error {
	u := im.upd
	fail := func(step string, err error) error {
		return fmt.Errorf("%s: flush (%s): %w", im.name, step, err)
	}
	if !im.dirtyMeta() {
		if err := u.sync(); err != nil {
			return fail("data", err)
		}
		return nil
	}
	// 1. data, and the file long enough for everything allocated.
	if st, err := u.f.Stat(); err == nil && st.Size() < u.fileEnd {
		if err := u.f.Truncate(u.fileEnd); err != nil {
			return fail("extend", err)
		}
	}
	if err := u.sync(); err != nil {
		return fail("data", err)
	}
	// 2. dirty bit.
	im.h.Incompatible |= IncompatDirty
	if err := im.writeHeader(); err != nil {
		return fail("header", err)
	}
	// 3. refcount increments.
	if err := im.writeRefcounts(); err != nil {
		return fail("refcounts", err)
	}
	if u.rtMoved {
		im.h.RefcountTableOffset, im.h.RefcountTableClusters = uint64(u.rtOff), uint32(u.rtClusters)
		if err := im.writeHeader(); err != nil {
			return fail("header", err)
		}
		u.rtMoved = false
	}
	// 4. L2 tables, then L1.
	idx := make([]int64, 0, len(im.l2))
	for i, t := range im.l2 {
		if t.dirty {
			idx = append(idx, i)
		}
	}
	sort.Slice(idx, func(a, b int) bool { return idx[a] < idx[b] })
	buf := make([]byte, im.cs)
	for _, i := range idx {
		t := im.l2[i]
		for j, e := range t.e {
			binary.BigEndian.PutUint64(buf[8*j:], e)
		}
		if err := u.write(buf, int64(t.off)); err != nil {
			return fail("L2 table", err)
		}
	}
	if len(idx) > 0 {
		if err := u.sync(); err != nil {
			return fail("L2 tables", err)
		}
	}
	for _, i := range idx {
		im.l2[i].dirty = false
	}
	if u.l1Moved {
		raw := make([]byte, (u.l1Cap*8+im.cs-1)/im.cs*im.cs)
		for i, e := range im.l1 {
			binary.BigEndian.PutUint64(raw[8*i:], e)
		}
		if err := u.write(raw, u.l1Off); err != nil {
			return fail("L1 table", err)
		}
	} else {
		for _, i := range sortedKeys(u.l1Dirty) {
			var b [8]byte
			binary.BigEndian.PutUint64(b[:], im.l1[i])
			if err := u.write(b[:], u.l1Off+8*i); err != nil {
				return fail("L1 table", err)
			}
		}
	}
	if err := u.sync(); err != nil {
		return fail("L1 table", err)
	}
	clear(u.l1Dirty)
	if u.l1Moved || u.hdrDirty {
		im.h.L1TableOffset, im.h.L1Size = uint64(u.l1Off), uint32(len(im.l1))
		if err := im.writeHeader(); err != nil {
			return fail("header", err)
		}
		u.l1Moved, u.hdrDirty = false, false
	}
	// 5. refcount decrements, then give the space back.
	frees := u.frees
	u.frees = nil
	var punch []int64
	for _, c := range frees {
		if err := im.addRef(c, -1); err != nil {
			return fail("refcounts", err)
		}
		blk := u.blocks[c/u.perBlock]
		if getRefcount(blk, c%u.perBlock, u.order) == 0 {
			punch = append(punch, c)
		}
	}
	if err := im.writeRefcounts(); err != nil {
		return fail("refcounts", err)
	}
	for _, c := range punch {
		// Best effort: a file system without hole punching keeps the bytes.
		_ = unix.Fallocate(int(u.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, c*im.cs, im.cs)
	}
	// 6. clean again.
	im.h.Incompatible &^= IncompatDirty
	if err := im.writeHeader(); err != nil {
		return fail("header", err)
	}
	// Keep the refcount block cache bounded: clean blocks can be re-read.
	if len(u.blocks) > 64 {
		clear(u.blocks)
	}
	return nil
}

// writeRefcounts writes dirty refcount blocks and table entries, then syncs.
func (im *Image) writeRefcounts() error {
	u := im.upd
	for _, bi := range sortedKeys(u.blockDirty) {
		if err := u.write(u.blocks[bi], int64(u.rt[bi]&offsetMask)); err != nil {
			return err
		}
	}
	if u.rtMoved {
		raw := make([]byte, u.rtClusters*im.cs)
		for i, e := range u.rt {
			binary.BigEndian.PutUint64(raw[8*i:], e)
		}
		if err := u.write(raw, u.rtOff); err != nil {
			return err
		}
	} else {
		for _, i := range sortedKeys(u.rtDirty) {
			var b [8]byte
			binary.BigEndian.PutUint64(b[:], u.rt[i])
			if err := u.write(b[:], u.rtOff+8*i); err != nil {
				return err
			}
		}
	}
	if err := u.sync(); err != nil {
		return err
	}
	clear(u.blockDirty)
	clear(u.rtDirty)
	return nil
}

// writeHeader rewrites the fixed part of a v3 header (one sector, so the
// update is atomic) and syncs.
func (im *Image) writeHeader() error {
	b := make([]byte, 104)
	im.h.encodeFixed(b)
	if err := im.upd.write(b, 0); err != nil {
		return err
	}
	return im.upd.sync()
}

func sortedKeys(m map[int64]bool) []int64 {
	out := make([]int64, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Slice(out, func(a, b int) bool { return out[a] < out[b] })
	return out
}

// closeUpdate flushes and marks the image closed.
func (im *Image) closeUpdate() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.upd.closed {
		return nil
	}
	err := im.flush()
	im.upd.closed = true
	return err
}

var _ io.WriterAt = (*Image)(nil)
