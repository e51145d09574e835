package vmdk

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// seg is a piece of an extent's map, in extent-relative bytes.
type seg struct {
	off, n int64
	typ    block.ExtentType
	// Data only: for a plain grain the file offset of byte off; for a
	// compressed grain the file offset of its grain marker, and gOff the
	// extent-relative offset where the grain starts.
	pos  int64
	gOff int64
	comp bool
}

// appendSeg adds s to segs, merging it into the last one when both are holes,
// both zeros, or plain data contiguous in the file too (one read for a run
// of grains).
func appendSeg(segs []seg, s seg) []seg {
	if s.n <= 0 {
		return segs
	}
	if n := len(segs); n > 0 {
		l := &segs[n-1]
		if l.typ == s.typ && l.off+l.n == s.off && !l.comp && !s.comp && (s.typ != block.Data || l.pos+l.n == s.pos) {
			l.n += s.n
			return segs
		}
	}
	return append(segs, s)
}

// extent is one extent of a descriptor: it maps its own bytes and reads them.
type extent interface {
	// mapRange appends the map of [off, off+n) (extent-relative, inside the
	// extent) to segs. Holes are where this extent has nothing (a parent,
	// if any, supplies the bytes).
	mapRange(ctx context.Context, off, n int64, segs []seg) ([]seg, error)
	// readData reads consecutive Data segs into p, which covers them exactly.
	readData(p []byte, segs []seg) error
	// allocated returns the bytes of data the extent holds in its first
	// size bytes.
	allocated(ctx context.Context, size int64) (int64, error)
	close() error
}

// Normalised grain table entries: a file byte offset (>= 0) or one of these.
const (
	entHole int64 = -1 // not allocated here
	entZero int64 = -2 // reads as zeros, masks any parent
)

// grainTable is the engine shared by every grain-directory format (hosted
// sparse and streamOptimized, COWD, seSparse): a directory of grain tables,
// loaded on demand and cached, mapping grains to file offsets.
type grainTable struct {
	name       string // the file, for messages
	f          sources.File
	fsize      int64
	grain      int64 // bytes per grain
	perGT      int64 // grains per grain table
	covered    int64 // virtual bytes the directory covers (its capacity)
	gtLoc      []int64
	entrySize  int64                                       // bytes per table entry (4 or 8)
	decode     func(gt int, raw []uint64) ([]int64, error) // raw table -> normalised entries
	compressed bool
	markers    bool

	mu       sync.Mutex
	cache    map[int][]int64
	cacheMax int

	spans  sync.Pool // *[]byte: compressed runs read in one go
	grains sync.Pool // *[]byte of grain bytes: partial-grain inflate
	zr     sync.Pool // *inflater
}

// gtCacheBytes bounds the decoded grain tables kept per extent (8 bytes per
// entry), so that a deep chain of large disks stays within a bounded
// memory: 8 MiB covers 64 GiB of 64 KiB grains, 512 MiB of a COWD with
// 512-byte grains, 4 GiB of seSparse. Past that, tables are re-read when
// needed (one small read per table span of data).
const gtCacheBytes = 8 << 20

func (t *grainTable) init() {
	t.cache = map[int][]int64{}
	t.cacheMax = max(16, int(gtCacheBytes/(8*t.perGT)))
}

// checkBudget refuses a directory that lists more grain tables than the
// file can hold: tables cannot overlap in a sound file, so this bounds the
// work and memory of reading every table by the file size.
func (t *grainTable) checkBudget(entrySize int64) error {
	var n int64
	for _, l := range t.gtLoc {
		if l >= 0 {
			n++
		}
	}
	if n*t.perGT*entrySize > t.fsize {
		return fmt.Errorf("%s: grain directory lists %d grain tables of %d bytes, more than the file (%d bytes) can hold", t.name, n, t.perGT*entrySize, t.fsize)
	}
	return nil
}

// table returns the normalised entries of grain table i (nil: all holes).
func (t *grainTable) table(i int) ([]int64, error) {
	if i >= len(t.gtLoc) || t.gtLoc[i] < 0 {
		return nil, nil
	}
	t.mu.Lock()
	ents, ok := t.cache[i]
	t.mu.Unlock()
	if ok {
		return ents, nil
	}
	raw, err := t.readTable("grain table", i, t.gtLoc[i], t.perGT, int(t.entrySize))
	if err != nil {
		return nil, err
	}
	return t.store(i, raw)
}

// store decodes, checks and caches grain table i.
func (t *grainTable) store(i int, raw []uint64) ([]int64, error) {
	ents, err := t.decode(i, raw)
	if err != nil {
		return nil, err
	}
	for j, e := range ents {
		if e >= t.fsize {
			return nil, fmt.Errorf("%s: grain table %d entry %d points at file offset %d, beyond the end of the file (%d bytes)", t.name, i, j, e, t.fsize)
		}
	}
	t.mu.Lock()
	if len(t.cache) >= t.cacheMax {
		for k := range t.cache { // drop an arbitrary table
			delete(t.cache, k)
			break
		}
	}
	t.cache[i] = ents
	t.mu.Unlock()
	return ents, nil
}

// readTable reads a table of n little-endian entries of size 4 or 8 at byte
// offset off, after checking that it lies inside the file.
func (t *grainTable) readTable(what string, idx int, off, n int64, size int) ([]uint64, error) {
	if off < 0 || off > t.fsize || n*int64(size) > t.fsize-off {
		return nil, fmt.Errorf("%s: %s %d at offset %d (%d entries) extends beyond the end of the file (%d bytes)", t.name, what, idx, off, n, t.fsize)
	}
	b := make([]byte, n*int64(size))
	if err := readFull(t.f, t.name, b, off); err != nil {
		return nil, err
	}
	out := make([]uint64, n)
	for i := range out {
		if size == 4 {
			out[i] = uint64(binary.LittleEndian.Uint32(b[4*i:]))
		} else {
			out[i] = binary.LittleEndian.Uint64(b[8*i:])
		}
	}
	return out, nil
}

func (t *grainTable) close() error { return t.f.Close() }

func (t *grainTable) mapRange(_ context.Context, off, n int64, segs []seg) ([]seg, error) {
	end := off + n
	for pos := off; pos < end; {
		if pos >= t.covered {
			segs = appendSeg(segs, seg{off: pos, n: end - pos, typ: block.Hole})
			break
		}
		g := pos / t.grain
		gt := int(g / t.perGT)
		ents, err := t.table(gt)
		if err != nil {
			return nil, err
		}
		if ents == nil { // no grain table: the whole table's span is a hole
			segEnd := min((int64(gt)+1)*t.perGT*t.grain, end, t.covered)
			segs = appendSeg(segs, seg{off: pos, n: segEnd - pos, typ: block.Hole})
			pos = segEnd
			continue
		}
		for gi := g % t.perGT; gi < t.perGT && pos < end && pos < t.covered; gi++ {
			gs := g * t.grain
			segEnd := min(gs+t.grain, end, t.covered)
			e := ents[gi]
			s := seg{off: pos, n: segEnd - pos}
			switch {
			case e == entHole:
				s.typ = block.Hole
			case e == entZero:
				s.typ = block.Zero
			case t.compressed:
				s.typ, s.comp, s.pos, s.gOff = block.Data, true, e, gs
			default:
				s.typ, s.pos = block.Data, e+(pos-gs)
			}
			segs = appendSeg(segs, s)
			pos = segEnd
			g++
		}
	}
	return segs, nil
}

// allocated counts the bytes of data grains in the first size bytes.
func (t *grainTable) allocated(_ context.Context, size int64) (int64, error) {
	size = min(size, t.covered)
	grains := (size + t.grain - 1) / t.grain
	var n int64
	for gt := range t.gtLoc {
		if int64(gt)*t.perGT >= grains {
			break
		}
		if err := t.prefetch(gt); err != nil {
			return 0, err
		}
		ents, err := t.table(gt)
		if err != nil {
			return 0, err
		}
		for i, e := range ents {
			if int64(gt)*t.perGT+int64(i) >= grains {
				break
			}
			if e >= 0 {
				n += t.grain
			}
		}
	}
	return n, nil
}

// prefetch loads grain table i and the tables after it that follow it in
// the file (writers place them back to back), with one read of up to
// 4 MiB: over HTTP or SSH that is one request instead of one per table.
func (t *grainTable) prefetch(i int) error {
	if i >= len(t.gtLoc) || t.gtLoc[i] < 0 {
		return nil
	}
	t.mu.Lock()
	_, ok := t.cache[i]
	t.mu.Unlock()
	if ok {
		return nil
	}
	tb := t.perGT * t.entrySize
	j := i + 1
	for j < len(t.gtLoc) && t.gtLoc[j] == t.gtLoc[j-1]+tb && int64(j-i+1)*tb <= 4<<20 {
		j++
	}
	if j == i+1 {
		return nil // a single table: table() reads it
	}
	raw, err := t.readTable("grain tables", i, t.gtLoc[i], int64(j-i)*t.perGT, int(t.entrySize))
	if err != nil {
		return err
	}
	for k := i; k < j; k++ {
		o := int64(k-i) * t.perGT
		if _, err := t.store(k, raw[o:o+t.perGT]); err != nil {
			return err
		}
	}
	return nil
}

func (t *grainTable) readData(p []byte, segs []seg) error {
	if !t.compressed {
		o := int64(0)
		for _, s := range segs {
			if err := readFull(t.f, t.name, p[o:o+s.n], s.pos); err != nil {
				return err
			}
			o += s.n
		}
		return nil
	}
	return t.readCompressed(p, segs)
}

// maxCompressed bounds a compressed grain: deflate's worst case (stored
// blocks) adds 5 bytes per 16 KiB block plus the zlib header and trailer.
func (t *grainTable) maxCompressed() int64 { return t.grain + t.grain/1024 + 64 }

// readCompressed inflates consecutive compressed grains. Grains that follow
// each other in the file (as a stream writer lays them out) are read with one
// ReadAt for the run, so sequential reads read each byte of the file once.
func (t *grainTable) readCompressed(p []byte, segs []seg) error {
	if !t.markers {
		// Compressed grains without markers: the stream ends itself.
		o := int64(0)
		for _, s := range segs {
			n := min(t.maxCompressed(), t.fsize-s.pos)
			bp := t.span(n)
			if err := readFull(t.f, t.name, *bp, s.pos); err != nil {
				t.spans.Put(bp)
				return err
			}
			err := t.inflateInto(p[o:o+s.n], s, *bp)
			t.spans.Put(bp)
			if err != nil {
				return err
			}
			o += s.n
		}
		return nil
	}
	o := int64(0)
	for i := 0; i < len(segs); {
		j := i + 1
		for j < len(segs) && segs[j].pos > segs[j-1].pos && segs[j].pos-segs[j-1].pos <= t.maxCompressed()+4096 {
			j++
		}
		first, last := segs[i].pos, segs[j-1].pos
		n := min(last+512, t.fsize) - first
		if last+12 > t.fsize {
			return fmt.Errorf("%s: grain marker at offset %d is cut off by the end of the file (%d bytes)", t.name, last, t.fsize)
		}
		bp := t.span(n)
		buf := *bp
		if err := readFull(t.f, t.name, buf, first); err != nil {
			t.spans.Put(bp)
			return err
		}
		// Extend the buffer to the end of the last grain.
		rel := last - first
		size := int64(binary.LittleEndian.Uint32(buf[rel+8:]))
		if size > t.maxCompressed() || last+12+size > t.fsize {
			t.spans.Put(bp)
			return fmt.Errorf("%s: grain marker at offset %d: field size is %d bytes, more than a grain can take or the file holds", t.name, last, size)
		}
		if need := rel + 12 + size; need > n {
			nb := t.span(need)
			copy(*nb, buf)
			if err := readFull(t.f, t.name, (*nb)[n:need], first+n); err != nil {
				t.spans.Put(bp)
				t.spans.Put(nb)
				return err
			}
			t.spans.Put(bp)
			bp, buf = nb, (*nb)[:need]
		}
		for k := i; k < j; k++ {
			s := segs[k]
			r := s.pos - first
			var err error
			if r+12 > int64(len(buf)) || r+12+int64(binary.LittleEndian.Uint32(buf[r+8:])) > int64(len(buf)) {
				err = t.readOneCompressed(p[o:o+s.n], s) // grains out of file order
			} else {
				err = t.inflateMarked(p[o:o+s.n], s, buf[r:])
			}
			if err != nil {
				t.spans.Put(bp)
				return err
			}
			o += s.n
		}
		t.spans.Put(bp)
		i = j
	}
	return nil
}

func (t *grainTable) readOneCompressed(dst []byte, s seg) error {
	var hdr [12]byte
	if err := readFull(t.f, t.name, hdr[:], s.pos); err != nil {
		return err
	}
	size := int64(binary.LittleEndian.Uint32(hdr[8:]))
	if size > t.maxCompressed() || s.pos+12+size > t.fsize {
		return fmt.Errorf("%s: grain marker at offset %d: field size is %d bytes, more than a grain can take or the file holds", t.name, s.pos, size)
	}
	bp := t.span(12 + size)
	defer t.spans.Put(bp)
	if err := readFull(t.f, t.name, *bp, s.pos); err != nil {
		return err
	}
	return t.inflateMarked(dst, s, *bp)
}

// inflateMarked checks a grain marker {lba u64, size u32} at the start of b
// and inflates the grain it carries.
func (t *grainTable) inflateMarked(dst []byte, s seg, b []byte) error {
	lba := binary.LittleEndian.Uint64(b)
	size := int64(binary.LittleEndian.Uint32(b[8:]))
	if want := uint64(s.gOff / 512); lba != want {
		return fmt.Errorf("%s: grain marker at offset %d: field lba is %d, but the grain table places it at sector %d", t.name, s.pos, lba, want)
	}
	if size > t.maxCompressed() || 12+size > int64(len(b)) {
		return fmt.Errorf("%s: grain marker at offset %d: field size is %d bytes, more than a grain can take or the file holds", t.name, s.pos, size)
	}
	return t.inflateInto(dst, s, b[12:12+size])
}

// inflateInto decompresses the grain of s from z and copies the part s
// covers into dst.
func (t *grainTable) inflateInto(dst []byte, s seg, z []byte) error {
	full := s.off == s.gOff && s.n == t.grain
	var out []byte
	var gp *[]byte
	if full {
		out = dst
	} else {
		gp = t.grainBuf()
		defer t.grains.Put(gp)
		out = *gp
	}
	n, err := t.inflate(out, z)
	if err != nil {
		return fmt.Errorf("%s: compressed grain at offset %d (virtual sector %d): %w", t.name, s.pos, s.gOff/512, err)
	}
	want := min(t.grain, t.covered-s.gOff)
	if int64(n) < want {
		return fmt.Errorf("%s: compressed grain at offset %d (virtual sector %d) inflates to %d bytes, want %d", t.name, s.pos, s.gOff/512, n, want)
	}
	if !full {
		copy(dst, out[s.off-s.gOff:s.off-s.gOff+s.n])
	}
	return nil
}

// inflate decompresses a zlib stream into out with a pooled inflater.
func (t *grainTable) inflate(out []byte, z []byte) (int, error) {
	in, _ := t.zr.Get().(*inflater)
	if in == nil {
		in = &inflater{}
	}
	defer t.zr.Put(in)
	return in.inflate(out, z)
}

func (t *grainTable) span(n int64) *[]byte {
	bp, _ := t.spans.Get().(*[]byte)
	if bp == nil || int64(cap(*bp)) < n {
		// Round up so that pooled buffers fit the next request too.
		c := int64(256 << 10)
		for c < n {
			c *= 2
		}
		b := make([]byte, n, c)
		return &b
	}
	*bp = (*bp)[:n]
	return bp
}

func (t *grainTable) grainBuf() *[]byte {
	bp, _ := t.grains.Get().(*[]byte)
	if bp == nil {
		b := make([]byte, t.grain)
		bp = &b
	}
	return bp
}

// readFull reads len(b) bytes at off or fails naming the file and offset.
func readFull(f sources.File, name string, b []byte, off int64) error {
	n, err := f.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("%s: reading %d bytes at offset %d: unexpected end of file (%d bytes)", name, len(b), off, f.Size())
	}
	return fmt.Errorf("%s: reading %d bytes at offset %d: %w", name, len(b), off, err)
}
