package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/internal/atomicfile"
	"io"
	"math/bits"
	"sort"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sinks"
)

// DefaultClusterSize is the cluster size of images we create.
const DefaultClusterSize = 64 << 10

// SinkFormat is qcow2 as a sinks.Format.
type SinkFormat struct{}

// Name implements sinks.Format.
func (SinkFormat) Name() string { return "qcow2" }

// Create implements sinks.Format.
func (SinkFormat) Create(_ context.Context, path string, size int64, opts sinks.Options) (sinks.Output, error) {
	if opts.BackingFile != "" {
		return nil, fmt.Errorf("%s: the streaming qcow2 writer makes standalone images; use CreateOverlay for an overlay", path)
	}
	return Create(path, size, opts)
}

// Writer is a fresh qcow2 image being written (a sinks.Output). See the
// package comment for its layout.
type Writer struct {
	f        *atomicfile.File
	size     int64
	cs       int64
	cb       uint32
	compress bool
	codec    *codec
	prealloc bool
	backing  string // overlays made by CreateOverlay
	backFmt  string

	mu      sync.Mutex
	l2      [][]uint64 // per L1 index; nil until written
	next    int64      // append pointer (bytes)
	pending map[int64]*partial
	seq     int64
	maxPend int64     // bytes of partial clusters held before evicting
	scratch sync.Pool // *[]byte compression buffers
	done    bool
}

// partial is a compressed-mode cluster written in pieces.
type partial struct {
	buf  []byte
	have []span // written byte ranges, sorted, merged
	seq  int64  // creation order, to evict the oldest
}

// maxPendingBytes bounds the partial clusters held in memory. Parts of a
// cluster that never arrive (the copier skips zero granules and holes)
// would otherwise keep it pending until Commit; past the bound the oldest
// is stored as it is (its missing parts read zeros) and a later write to it
// rewrites it.
const maxPendingBytes = 64 << 20

type span struct{ s, e int64 }

// Create starts a fresh qcow2 image at path (written as a hidden temporary
// file beside it until Commit).
func Create(path string, size int64, opts sinks.Options) (*Writer, error) {
	if size < 0 {
		return nil, fmt.Errorf("%s: negative size %d", path, size)
	}
	// qemu sees whole 512-byte sectors only: a size that is not a multiple
	// is rounded up (the tail reads zeros).
	size = (size + 511) &^ 511
	cs := opts.ClusterSize
	if cs == 0 {
		cs = DefaultClusterSize
	}
	if cs < 1<<MinClusterBits || cs > 1<<MaxClusterBits || cs&(cs-1) != 0 {
		return nil, fmt.Errorf("%s: cluster size %d is not a power of two from 512 to 2 MiB", path, cs)
	}
	typ, compress, err := parseCompression(opts.Compress)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	prealloc := false
	switch opts.Preallocation {
	case "", "off":
	case "metadata":
		prealloc = true
	default:
		return nil, fmt.Errorf("%s: preallocation %q is not supported (off or metadata)", path, opts.Preallocation)
	}
	if prealloc && compress {
		return nil, fmt.Errorf("%s: compression and preallocation=metadata exclude each other", path)
	}
	cb := uint32(bits.TrailingZeros64(uint64(cs)))
	l1n := l1Needed(uint64(size), cb)
	if l1n*8 > maxL1Bytes {
		return nil, fmt.Errorf("%s: virtual size %d needs an L1 table over 32 MiB with %d-byte clusters; use larger clusters", path, size, cs)
	}
	f, err := atomicfile.Create(path, opts.NoSync)
	if err != nil {
		return nil, err
	}
	w := &Writer{
		f: f, size: size, cs: cs, cb: cb, compress: compress,
		codec: newCodec(typ, opts.CompressLevel), prealloc: prealloc,
		l2: make([][]uint64, l1n), next: cs, pending: map[int64]*partial{},
		maxPend: max(maxPendingBytes, 8*cs),
	}
	if prealloc {
		// Every guest cluster gets its host cluster now, in guest order;
		// the file stays sparse until written.
		per := cs / 8
		nclusters := (size + cs - 1) / cs
		for vc := int64(0); vc < nclusters; vc++ {
			t := w.table(vc / per)
			t[vc%per] = uint64(w.next) | flagCopied
			w.next += cs
		}
	}
	return w, nil
}

// TempName is the name the image is written under until Commit.
func (w *Writer) TempName() string { return w.f.Name() }

func (w *Writer) table(i int64) []uint64 {
	if w.l2[i] == nil {
		w.l2[i] = make([]uint64, w.cs/8)
	}
	return w.l2[i]
}

func (w *Writer) get(vc int64) uint64 {
	per := w.cs / 8
	t := w.l2[vc/per]
	if t == nil {
		return 0
	}
	return t[vc%per]
}

func (w *Writer) set(vc int64, e uint64) { per := w.cs / 8; w.table(vc / per)[vc%per] = e }

func (w *Writer) check(off, n int64) error {
	if w.done {
		return errors.New("qcow2 output: already finished")
	}
	if off < 0 || n < 0 || off+n > w.size {
		return fmt.Errorf("qcow2 output: range [%d,+%d) outside size %d", off, n, w.size)
	}
	return nil
}

// WriteAt implements block.Writer. It may be called from several
// goroutines at once, for different ranges.
func (w *Writer) WriteAt(p []byte, off int64) (int, error) {
	if err := w.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if w.compress {
		return w.writeCompressed(p, off)
	}
	// Assign host clusters to every cluster touched, consecutive new ones
	// contiguously, then write runs of contiguous host ranges.
	type run struct{ host, pos, n int64 }
	var runs []run
	w.mu.Lock()
	for pos, end := off, off+int64(len(p)); pos < end; {
		vc, in := pos/w.cs, pos%w.cs
		n := min(end-pos, w.cs-in)
		e := w.get(vc)
		if e&offsetMask == 0 {
			host := (w.next + w.cs - 1) &^ (w.cs - 1)
			w.next = host + w.cs
			e = uint64(host) | flagCopied
			w.set(vc, e)
		}
		host := int64(e&offsetMask) + in
		if k := len(runs) - 1; k >= 0 && runs[k].host+runs[k].n == host {
			runs[k].n += n
		} else {
			runs = append(runs, run{host, pos - off, n})
		}
		pos += n
	}
	w.mu.Unlock()
	for _, r := range runs {
		if _, err := w.f.WriteAt(p[r.pos:r.pos+r.n], r.host); err != nil {
			return int(r.pos), fmt.Errorf("%s: %w", w.f.Name(), err)
		}
	}
	return len(p), nil
}

func (w *Writer) writeCompressed(p []byte, off int64) (int, error) {
	bp, _ := w.scratch.Get().(*[]byte)
	if bp == nil {
		b := make([]byte, 0, w.cs+w.cs/8+4096) // worst-case deflate/zstd growth
		bp = &b
	}
	comp := (*bp)[:0]
	defer func() { *bp = comp[:0]; w.scratch.Put(bp) }()
	for pos, end := off, off+int64(len(p)); pos < end; {
		vc, in := pos/w.cs, pos%w.cs
		clen := min(w.cs, w.size-vc*w.cs) // bytes of this guest cluster
		n := min(end-pos, clen-in)
		chunk := p[pos-off : pos-off+n]
		pos += n
		w.mu.Lock()
		pt := w.pending[vc]
		if pt == nil && in == 0 && n == clen {
			w.mu.Unlock()
			var err error
			if comp, err = w.store(vc, chunk, comp[:0], false); err != nil {
				return int(pos - n - off), err
			}
			continue
		}
		if pt == nil {
			w.seq++
			pt = &partial{buf: make([]byte, w.cs), seq: w.seq}
			if e := w.get(vc); e != 0 {
				// Rewriting part of a cluster already stored: start from it.
				if err := w.readBack(pt.buf, e); err != nil {
					w.mu.Unlock()
					return int(pos - n - off), err
				}
				pt.have = []span{{0, clen}}
			}
			w.pending[vc] = pt
			if err := w.evict(); err != nil {
				w.mu.Unlock()
				return int(pos - n - off), err
			}
		}
		copy(pt.buf[in:], chunk)
		pt.add(in, in+n)
		full := len(pt.have) == 1 && pt.have[0].s == 0 && pt.have[0].e >= clen
		if full {
			delete(w.pending, vc)
		}
		w.mu.Unlock()
		if full {
			var err error
			if comp, err = w.store(vc, pt.buf[:clen], comp[:0], false); err != nil {
				return int(pos - n - off), err
			}
		}
	}
	return len(p), nil
}

// evict stores the oldest partial clusters while too many are held. mu held.
func (w *Writer) evict() error {
	for int64(len(w.pending))*w.cs > w.maxPend {
		var old int64 = -1
		for vc, pt := range w.pending {
			if old < 0 || pt.seq < w.pending[old].seq {
				old = vc
			}
		}
		pt := w.pending[old]
		delete(w.pending, old)
		if _, err := w.store(old, pt.buf[:min(w.cs, w.size-old*w.cs)], nil, true); err != nil {
			return err
		}
	}
	return nil
}

func (p *partial) add(s, e int64) {
	p.have = append(p.have, span{s, e})
	sort.Slice(p.have, func(i, j int) bool { return p.have[i].s < p.have[j].s })
	out := p.have[:1]
	for _, x := range p.have[1:] {
		last := &out[len(out)-1]
		if x.s <= last.e {
			last.e = max(last.e, x.e)
		} else {
			out = append(out, x)
		}
	}
	p.have = out
}

// readBack reads a stored cluster (compressed or not) back into buf.
func (w *Writer) readBack(buf []byte, e uint64) error {
	d, err := decodeL2(e, w.cb, 3)
	if err != nil {
		return err
	}
	// The file may end inside the last cluster or sector: past it is zeros.
	switch d.kind {
	case kindNormal:
		var n int
		n, err = w.f.ReadAt(buf, int64(d.host))
		if errors.Is(err, io.EOF) {
			clear(buf[n:])
			err = nil
		}
	case kindCompressed:
		src := make([]byte, d.length)
		var n int
		if n, err = w.f.ReadAt(src, int64(d.host)); err == nil || errors.Is(err, io.EOF) {
			err = w.codec.decompress(buf, src[:n])
		}
	}
	if err != nil {
		return fmt.Errorf("%s: reading back a stored cluster: %w", w.f.Name(), err)
	}
	return nil
}

// store compresses one guest cluster and appends it. A cluster that does
// not shrink by at least a sector is stored uncompressed, like qemu does.
// held says the caller holds mu (evictions); otherwise compression runs
// unlocked, in the caller's goroutine, in parallel with other writers.
func (w *Writer) store(vc int64, data, scratch []byte, held bool) ([]byte, error) {
	lock, unlock := w.mu.Lock, w.mu.Unlock
	if held {
		lock, unlock = func() {}, func() {}
	}
	if block.IsZero(data) {
		lock()
		w.set(vc, 0)
		unlock()
		return scratch, nil
	}
	comp, err := w.codec.compress(scratch, data)
	if err != nil {
		return scratch, fmt.Errorf("%s: compressing guest cluster %d: %w", w.f.Name(), vc, err)
	}
	var host int64
	lock()
	if int64(len(comp)) > w.cs-512 {
		host = (w.next + w.cs - 1) &^ (w.cs - 1)
		w.next = host + w.cs
		w.set(vc, uint64(host)|flagCopied)
		comp = data
	} else {
		// Pieces start on a sector, so one host cluster holds at most
		// cluster/512 of them and its refcount fits 16 bits.
		host = (w.next + 511) &^ 511
		w.next = host + int64(len(comp))
		w.set(vc, encodeCompressed(uint64(host), int64(len(comp)), w.cb))
	}
	// Written before unlocking, so a later partial write to the same
	// cluster always reads it back complete.
	_, err = w.f.WriteAt(comp, host)
	unlock()
	if err != nil {
		return comp, fmt.Errorf("%s: %w", w.f.Name(), err)
	}
	if &comp[0] == &data[0] {
		return scratch, nil
	}
	return comp, nil // scratch, grown if it had to
}

// Zero implements block.Writer. A fresh image reads zeros everywhere, so
// Zero only matters for ranges written before; those become unallocated
// (or read zeros through the zero flag with preallocation=metadata).
func (w *Writer) Zero(off, length int64) error {
	if err := w.check(off, length); err != nil {
		return err
	}
	if w.prealloc {
		// Host offsets are guest offsets plus one cluster: punch them out.
		if length == 0 {
			return nil
		}
		err := unix.Fallocate(int(w.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, w.cs+off, length)
		if err == nil {
			return nil
		}
		zeros := make([]byte, min(length, 1<<20))
		for pos := off; pos < off+length; pos += int64(len(zeros)) {
			n := min(int64(len(zeros)), off+length-pos)
			if _, err := w.f.WriteAt(zeros[:n], w.cs+pos); err != nil {
				return fmt.Errorf("%s: %w", w.f.Name(), err)
			}
		}
		return nil
	}
	var zeros []byte
	for pos, end := off, off+length; pos < end; {
		vc, in := pos/w.cs, pos%w.cs
		clen := min(w.cs, w.size-vc*w.cs)
		n := min(end-pos, clen-in)
		w.mu.Lock()
		e, pt := w.get(vc), w.pending[vc]
		switch {
		case e == 0 && pt == nil:
		case in == 0 && n == clen:
			delete(w.pending, vc)
			w.set(vc, 0)
		default:
			e = 1 // partial: write zeros below
		}
		w.mu.Unlock()
		if e == 1 {
			if zeros == nil {
				zeros = make([]byte, w.cs)
			}
			if _, err := w.WriteAt(zeros[:n], pos); err != nil {
				return err
			}
		}
		pos += n
	}
	return nil
}

// Flush implements block.Writer. A fresh image becomes durable on Commit;
// Flush syncs what has been written so far.
func (w *Writer) Flush() error { return w.f.Sync() }

// Abort implements sinks.Output.
func (w *Writer) Abort() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.done = true
	return w.f.Abort()
}

// Commit implements sinks.Output: store pending partial clusters, append L2
// tables, the L1 table and the refcount structures, write the header, sync
// and rename into place.
func (w *Writer) Commit(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		w.Abort()
		return err
	}
	if w.done {
		return errors.New("qcow2 output: already finished")
	}
	if err := w.finish(); err != nil {
		w.Abort()
		return err
	}
	w.done = true
	return w.f.Commit()
}

func (w *Writer) finish() error {
	vcs := make([]int64, 0, len(w.pending))
	for vc := range w.pending {
		vcs = append(vcs, vc)
	}
	for _, vc := range vcs {
		clen := min(w.cs, w.size-vc*w.cs)
		if _, err := w.store(vc, w.pending[vc].buf[:clen], nil, false); err != nil {
			return err
		}
		delete(w.pending, vc)
	}
	cs := w.cs
	dataEnd := (w.next + cs - 1) &^ (cs - 1)
	// L2 tables that map something, in L1 order, right after the data.
	l1 := make([]uint64, len(w.l2))
	pos := dataEnd
	for i, t := range w.l2 {
		if t == nil || isZero64(t) {
			w.l2[i] = nil
			continue
		}
		l1[i] = uint64(pos) | flagCopied
		pos += cs
	}
	l1Off := pos
	l1Clusters := max(1, (int64(len(l1))*8+cs-1)/cs)
	pos += l1Clusters * cs
	// Refcount table and blocks at the end; they cover themselves.
	const order = 4
	perBlock := cs * 8 / (1 << order)
	rtOff := pos
	var rtClusters, blocks int64 = 1, 1
	for {
		total := pos/cs + rtClusters + blocks
		nb := (total + perBlock - 1) / perBlock
		nr := max(1, (nb*8+cs-1)/cs)
		if nb == blocks && nr == rtClusters {
			break
		}
		blocks, rtClusters = nb, nr
	}
	blocksOff := rtOff + rtClusters*cs
	end := blocksOff + blocks*cs
	total := end / cs

	rc := make([]uint16, total)
	rc[0] = 1
	for _, t := range w.l2 {
		for _, e := range t {
			switch {
			case e == 0:
			case e&flagCompressed != 0:
				d, _ := decodeL2(e, w.cb, 3)
				for c := int64(d.host) / cs; c <= (int64(d.host)+d.length-1)/cs; c++ {
					rc[c]++
				}
			case e&offsetMask != 0:
				rc[int64(e&offsetMask)/cs]++
			}
		}
	}
	for c := dataEnd / cs; c < total; c++ {
		rc[c] = 1
	}

	// Write L2 tables, L1, refcount table and blocks in file order.
	buf := make([]byte, cs)
	for _, t := range w.l2 {
		if t == nil {
			continue
		}
		for j, e := range t {
			binary.BigEndian.PutUint64(buf[8*j:], e)
		}
		if _, err := w.f.WriteAt(buf, dataEnd); err != nil {
			return fmt.Errorf("%s: writing L2 table: %w", w.f.Name(), err)
		}
		dataEnd += cs
	}
	if err := w.writeTable(l1, l1Off, l1Clusters); err != nil {
		return err
	}
	rt := make([]uint64, rtClusters*cs/8)
	for b := int64(0); b < blocks; b++ {
		rt[b] = uint64(blocksOff + b*cs)
	}
	if err := w.writeTable(rt, rtOff, rtClusters); err != nil {
		return err
	}
	for b := int64(0); b < blocks; b++ {
		clear(buf)
		for i := int64(0); i < perBlock && b*perBlock+i < total; i++ {
			binary.BigEndian.PutUint16(buf[2*i:], rc[b*perBlock+i])
		}
		if _, err := w.f.WriteAt(buf, blocksOff+b*cs); err != nil {
			return fmt.Errorf("%s: writing refcount block: %w", w.f.Name(), err)
		}
	}
	if w.prealloc {
		// Give the preallocated data area its full length (sparse).
		if st, err := w.f.Stat(); err == nil && st.Size() < end {
			if err := w.f.Truncate(end); err != nil {
				return err
			}
		}
	}
	h := &Header{
		ClusterBits: w.cb, Size: uint64(w.size), L1Size: uint32(len(l1)), L1TableOffset: uint64(l1Off),
		RefcountTableOffset: uint64(rtOff), RefcountTableClusters: uint32(rtClusters), RefcountOrder: order,
		CompressionType: w.codec.typ, BackingFile: w.backing, BackingFormat: w.backFmt,
	}
	if !w.compress {
		h.CompressionType = 0
	}
	hb, err := h.MarshalHeader()
	if err != nil {
		return fmt.Errorf("%s: %w", w.f.Name(), err)
	}
	if _, err := w.f.WriteAt(hb, 0); err != nil {
		return fmt.Errorf("%s: writing header: %w", w.f.Name(), err)
	}
	return nil // Commit syncs (unless opts.NoSync) and renames
}

func (w *Writer) writeTable(t []uint64, off, clusters int64) error {
	buf := make([]byte, clusters*w.cs)
	for i, e := range t {
		binary.BigEndian.PutUint64(buf[8*i:], e)
	}
	if _, err := w.f.WriteAt(buf, off); err != nil {
		return fmt.Errorf("%s: writing table at %d: %w", w.f.Name(), off, err)
	}
	return nil
}

func isZero64(t []uint64) bool {
	for _, e := range t {
		if e != 0 {
			return false
		}
	}
	return true
}
