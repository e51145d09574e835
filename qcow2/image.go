package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
)

// Image is an opened qcow2 image: a block.Device, and when opened with
// OpenUpdate also a block.Writable (see update.go). Reads may run from
// several goroutines; metadata lookups are serialised, data I/O is not.
type Image struct {
	name string // for messages
	r    io.ReaderAt
	h    *Header
	cs   int64
	cb   uint32
	size int64
	// fileSize bounds every offset read from a table.
	fileSize int64
	codec    *codec

	mu      sync.Mutex // guards l1, l2 and everything in upd
	l1      []uint64
	l2      map[int64]*l2table // by L1 index
	l2Max   int                // clean tables kept in the cache
	backing block.Device       // nil: unallocated clusters read zeros
	noBack  bool               // top layer only: unallocated clusters are holes
	closers []func() error

	upd *updater // nil when read-only
}

type l2table struct {
	off   uint64 // host offset
	e     []uint64
	dirty bool
}

// openImage reads the header and L1 table of a qcow2 file.
func openImage(name string, r io.ReaderAt, fileSize int64) (*Image, error) {
	head := make([]byte, min(fileSize, 1<<MaxClusterBits))
	if n, err := r.ReadAt(head, 0); n < len(head) {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("%s: reading header: %w", name, err)
	}
	h, err := ParseHeader(head, fileSize)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	im := &Image{
		name: name, r: r, h: h, cs: h.ClusterSize(), cb: h.ClusterBits, size: int64(h.Size),
		fileSize: fileSize, codec: newCodec(h.CompressionType, 0), l2: map[int64]*l2table{},
	}
	im.l2Max = max(16, int((32<<20)/im.cs))
	raw := make([]byte, int64(h.L1Size)*8) // bounded by ParseHeader (32 MiB, inside the file)
	if _, err := r.ReadAt(raw, int64(h.L1TableOffset)); err != nil && !(errors.Is(err, io.EOF) && len(raw) == 0) {
		return nil, fmt.Errorf("%s: reading L1 table at %d: %w", name, h.L1TableOffset, err)
	}
	im.l1 = make([]uint64, h.L1Size)
	for i := range im.l1 {
		e := binary.BigEndian.Uint64(raw[8*i:])
		off := e & offsetMask
		if off != 0 && (off%uint64(im.cs) != 0 || off > uint64(fileSize)-uint64(min(im.cs, fileSize))) {
			return nil, fmt.Errorf("%s: L1 entry %d (file offset %d): L2 table at %d is unaligned or past the end of the file (%d bytes)",
				name, i, h.L1TableOffset+uint64(8*i), off, fileSize)
		}
		im.l1[i] = e
	}
	return im, nil
}

// Header returns a copy of the image's header.
func (im *Image) Header() Header { return *im.h }

// Size implements block.Device.
func (im *Image) Size() int64 {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.size
}

// Close implements block.Device. For an updatable image it flushes first.
func (im *Image) Close() error {
	var err error
	if im.upd != nil {
		err = im.closeUpdate()
	}
	for i := len(im.closers) - 1; i >= 0; i-- {
		if e := im.closers[i](); err == nil {
			err = e
		}
	}
	im.closers = nil
	return err
}

// table returns the L2 table of L1 index i (nil when unallocated). mu held.
func (im *Image) table(i int64) (*l2table, error) {
	if t, ok := im.l2[i]; ok {
		return t, nil
	}
	off := im.l1[i] & offsetMask
	if off == 0 {
		return nil, nil
	}
	raw := make([]byte, im.cs)
	if n, err := im.r.ReadAt(raw, int64(off)); n < len(raw) {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("%s: reading L2 table %d at %d: %w", im.name, i, off, err)
	}
	t := &l2table{off: off, e: make([]uint64, im.cs/8)}
	for j := range t.e {
		t.e[j] = binary.BigEndian.Uint64(raw[8*j:])
	}
	if len(im.l2) >= im.l2Max {
		for k, v := range im.l2 {
			if !v.dirty {
				delete(im.l2, k)
				if len(im.l2) < im.l2Max {
					break
				}
			}
		}
	}
	im.l2[i] = t
	return t, nil
}

// lookup decodes the L2 entry of guest cluster vc. mu held.
func (im *Image) lookup(vc int64) (entry, error) {
	per := im.cs / 8
	i := vc / per
	if i >= int64(len(im.l1)) {
		return entry{}, nil
	}
	t, err := im.table(i)
	if err != nil || t == nil {
		return entry{}, err
	}
	raw := t.e[vc%per]
	e, err := decodeL2(raw, im.cb, im.h.Version)
	if err != nil {
		return entry{}, fmt.Errorf("%s: L2 table %d entry %d (guest offset %d): %w", im.name, i, vc%per, vc*im.cs, err)
	}
	switch e.kind {
	case kindNormal:
		if int64(e.host) >= im.fileSize && !im.ownsEnd(e.host) {
			return entry{}, fmt.Errorf("%s: guest offset %d maps to host cluster %d past the end of the file (%d bytes)", im.name, vc*im.cs, e.host, im.fileSize)
		}
	case kindCompressed:
		if int64(e.host) >= im.fileSize && !im.ownsEnd(e.host) {
			return entry{}, fmt.Errorf("%s: guest offset %d maps to compressed data at %d past the end of the file (%d bytes)", im.name, vc*im.cs, e.host, im.fileSize)
		}
	}
	return e, nil
}

// ownsEnd reports whether host lies in clusters the updater appended (the
// file may not have grown yet). mu held.
func (im *Image) ownsEnd(host uint64) bool {
	return im.upd != nil && int64(host) < im.upd.fileEnd
}

// ReadAt implements block.Device.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	size := im.Size()
	n, eof := block.ShortRead(p, off, size)
	for done := 0; done < n; {
		pos := off + int64(done)
		vc, in := pos/im.cs, pos%im.cs
		c := int(min(int64(n-done), im.cs-in))
		im.mu.Lock()
		e, err := im.lookup(vc)
		// Coalesce following clusters stored right after this one.
		for e.kind == kindNormal && err == nil && done+c < n {
			next, nerr := im.lookup(vc + 1)
			if nerr != nil || next.kind != kindNormal || next.host != e.host+uint64(in)+uint64(c) {
				break
			}
			vc++
			c += int(min(int64(n-done-c), im.cs))
		}
		im.mu.Unlock()
		if err != nil {
			return done, err
		}
		if err := im.readCluster(p[done:done+c], e, pos, in); err != nil {
			return done, err
		}
		done += c
	}
	return n, eof
}

// readCluster reads part of one guest cluster described by e.
func (im *Image) readCluster(p []byte, e entry, pos, in int64) error {
	switch e.kind {
	case kindZero:
		clear(p)
	case kindUnallocated:
		return im.readBacking(p, pos)
	case kindNormal:
		if n, err := im.r.ReadAt(p, int64(e.host)+in); n < len(p) {
			if errors.Is(err, io.EOF) || err == nil {
				// Past the end of the file: a sparse tail reads zeros.
				clear(p[n:])
				return nil
			}
			return fmt.Errorf("%s: reading guest offset %d at host %d: %w", im.name, pos, int64(e.host)+in, err)
		}
	case kindCompressed:
		buf := make([]byte, im.cs)
		if err := im.readCompressed(buf, e, pos-in); err != nil {
			return err
		}
		copy(p, buf[in:])
	}
	return nil
}

func (im *Image) readCompressed(dst []byte, e entry, guest int64) error {
	n := min(e.length, im.fileSize-int64(e.host))
	if im.upd != nil {
		n = e.length
	}
	src := make([]byte, n)
	if m, err := im.r.ReadAt(src, int64(e.host)); m < len(src) && !(errors.Is(err, io.EOF) && m > 0) {
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("%s: reading compressed cluster of guest offset %d at host %d: %w", im.name, guest, e.host, err)
	} else {
		src = src[:m]
	}
	if err := im.codec.decompress(dst, src); err != nil {
		return fmt.Errorf("%s: compressed cluster of guest offset %d at host %d: %w", im.name, guest, e.host, err)
	}
	return nil
}

// readBacking reads p at guest offset pos from the backing device, zeros
// where there is none.
func (im *Image) readBacking(p []byte, pos int64) error {
	if im.backing == nil || im.noBack {
		clear(p)
		return nil
	}
	bs := im.backing.Size()
	if pos >= bs {
		clear(p)
		return nil
	}
	n := int(min(int64(len(p)), bs-pos))
	if m, err := im.backing.ReadAt(p[:n], pos); m < n {
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("%s: reading backing file at %d: %w", im.name, pos, err)
	}
	clear(p[n:])
	return nil
}

// Extents implements block.Device: data for allocated and compressed
// clusters, zero for zero clusters, and for unallocated clusters what the
// backing file reports (holes where there is none).
func (im *Image) Extents(ctx context.Context, off, length int64) ([]block.Extent, error) {
	top, err := im.topExtents(ctx, off, length)
	if err != nil || im.backing == nil || im.noBack {
		return top, err
	}
	return block.Resolve(ctx, top, im.backingExtents)
}

func (im *Image) backingExtents(ctx context.Context, off, length int64) ([]block.Extent, error) {
	bs := im.backing.Size()
	var out []block.Extent
	if off < bs {
		n := min(length, bs-off)
		sub, err := im.backing.Extents(ctx, off, n)
		if err != nil {
			return nil, fmt.Errorf("%s: backing file: %w", im.name, err)
		}
		for _, e := range sub {
			out = block.Append(out, e)
		}
	}
	if end := off + length; end > bs {
		s := max(off, bs)
		out = block.Append(out, block.Extent{Off: s, Len: end - s, Type: block.Hole})
	}
	return out, nil
}

// topExtents maps this layer alone.
func (im *Image) topExtents(ctx context.Context, off, length int64) ([]block.Extent, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	off, length = block.ClipRange(im.size, off, length)
	end := off + length
	var out []block.Extent
	per := im.cs / 8
	span := im.cs * per
	for pos := off; pos < end; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		i := pos / span
		if i >= int64(len(im.l1)) || im.l1[i]&offsetMask == 0 {
			next := min(end, (i+1)*span)
			out = block.Append(out, block.Extent{Off: pos, Len: next - pos, Type: block.Hole})
			pos = next
			continue
		}
		vc := pos / im.cs
		e, err := im.lookup(vc)
		if err != nil {
			return nil, err
		}
		next := min(end, (vc+1)*im.cs)
		t := block.Data
		switch e.kind {
		case kindUnallocated:
			t = block.Hole
		case kindZero:
			t = block.Zero
		}
		out = block.Append(out, block.Extent{Off: pos, Len: next - pos, Type: t})
		pos = next
	}
	return out, nil
}

// OpenFile opens a local qcow2 file read-only. A backing file is opened
// relative to the image's folder: qcow2 through this package, anything else
// as raw (use the sources registry for other formats, as the CLI does).
func OpenFile(path string) (*Image, error) {
	return openLocal(path, nil)
}

// openPath opens a local qcow2 file with flag and parses its metadata;
// closing the image closes the file.
func openPath(path string, flag int) (*Image, *os.File, error) {
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	im, err := openImage(path, f, st.Size())
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	im.closers = append(im.closers, f.Close)
	return im, f, nil
}

func openLocal(path string, chain []string) (*Image, error) {
	im, _, err := openPath(path, os.O_RDONLY)
	if err != nil {
		return nil, err
	}
	if err := im.attachLocalBacking(path, chain); err != nil {
		im.Close()
		return nil, err
	}
	return im, nil
}

// maxChain bounds backing chains.
const maxChain = 64

func (im *Image) attachLocalBacking(path string, chain []string) error {
	if im.h.BackingFile == "" {
		return nil
	}
	bp := localBackingPath(path, im.h.BackingFile)
	chain = append(chain, path)
	if err := checkChain(chain, bp); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	dev, err := openLocalAny(bp, im.h.BackingFormat, chain)
	if err != nil {
		return fmt.Errorf("%s: opening backing file: %w", path, err)
	}
	im.backing = dev
	im.closers = append(im.closers, dev.Close)
	return nil
}

func checkChain(chain []string, next string) error {
	if len(chain) >= maxChain {
		return fmt.Errorf("backing chain deeper than %d images", maxChain)
	}
	for _, c := range chain {
		if c == next {
			return fmt.Errorf("backing file loop: %s is already in the chain", next)
		}
	}
	return nil
}

func localBackingPath(imagePath, backing string) string {
	if len(backing) > 0 && backing[0] == '/' {
		return backing
	}
	dir := "."
	for i := len(imagePath) - 1; i >= 0; i-- {
		if imagePath[i] == '/' {
			dir = imagePath[:i]
			if dir == "" {
				dir = "/"
			}
			break
		}
	}
	return dir + "/" + backing
}

// openLocalAny opens a local image as qcow2 (probed or named) or raw.
func openLocalAny(path, format string, chain []string) (block.Device, error) {
	if format == "" {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		var magic [4]byte
		n, _ := f.ReadAt(magic[:], 0)
		f.Close()
		if n == 4 && string(magic[:]) == Magic {
			format = "qcow2"
		} else {
			format = "raw"
		}
	}
	switch format {
	case "qcow2":
		return openLocal(path, chain)
	case "raw":
		return raw.OpenFile(path)
	}
	return nil, fmt.Errorf("%s: backing format %q can only be opened through the source registry", path, format)
}
