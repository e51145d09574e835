package vmdk

import (
	"context"
	"encoding/binary"
	"fmt"
	"path"
	"sort"
	"strings"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// Options tune how a chain is opened.
type Options struct {
	// AllowStaleChain opens a chain whose parent's CID differs from the
	// child's parentCID (the parent was written after the snapshot).
	AllowStaleChain bool
	// Parent, when set, names the top layer's parent (relative to the FS)
	// instead of its parentFileNameHint.
	Parent string
}

// MaxChainDepth is the most layers (the disk and its parents) opened.
const MaxChainDepth = 255

// Chain is an opened VMDK and its snapshot chain, flattened into one
// block.Device: each byte comes from the topmost layer that has it. It is
// safe for concurrent use.
type Chain struct {
	layers []*layer // top first
	size   int64
	info   sources.Info
}

// layer is one disk of the chain: a descriptor and its extents.
type layer struct {
	path  string // name relative to the FS
	name  string // for messages
	desc  *Descriptor
	exts  []placed
	size  int64
	props map[string]string
}

type placed struct {
	start, size int64
	e           extent
}

// Open opens name (already opened as f, or nil to open it through fsys) and
// every parent it names, through fsys. On error everything opened is closed,
// f included.
func Open(ctx context.Context, fsys sources.FS, name string, f sources.File, opts Options) (*Chain, error) {
	c := &Chain{}
	seen := map[string]bool{}
	cur, hint := name, ""
	for depth := 0; ; depth++ {
		if depth >= MaxChainDepth {
			c.Close()
			return nil, fmt.Errorf("%s: snapshot chain deeper than %d layers", fsys.Describe(name), MaxChainDepth)
		}
		var l *layer
		var err error
		if depth == 0 {
			l, err = openLayer(ctx, fsys, cur, f)
		} else {
			l, err = openParent(ctx, fsys, c.layers[depth-1], hint, seen)
		}
		if err != nil {
			c.Close()
			return nil, err
		}
		seen[l.name] = true
		if depth > 0 {
			child := c.layers[depth-1]
			if child.desc.ParentCID != l.desc.CID && !opts.AllowStaleChain {
				l.close()
				c.Close()
				return nil, fmt.Errorf("%s: stale snapshot chain: its parentCID is %08x but the parent %s has CID %08x (the parent was written after this snapshot was taken); pass --allow-stale-chain to read it anyway",
					child.name, child.desc.ParentCID, l.name, l.desc.CID)
			}
		}
		c.layers = append(c.layers, l)
		hint = l.desc.ParentFileNameHint
		if depth == 0 && opts.Parent != "" {
			hint = opts.Parent
		}
		if hint == "" {
			break
		}
	}
	c.size = c.layers[0].size
	if err := c.describe(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// openParent opens the parent a child names: relative to the child's
// folder, and when that does not open (an absolute ESXi path such as
// /vmfs/volumes/..., a Windows path, a folder moved since) the file of that
// base name next to the child, as dissect.hypervisor does. qemu uses the
// name as it is and fails.
func openParent(ctx context.Context, fsys sources.FS, child *layer, hint string, seen map[string]bool) (*layer, error) {
	cands := []string{join(child.path, hint)}
	base := hint
	if i := strings.LastIndexAny(base, `/\`); i >= 0 {
		base = base[i+1:]
	}
	if b := join(child.path, base); b != cands[0] {
		cands = append(cands, b)
	}
	var firstErr error
	for _, p := range cands {
		if seen[fsys.Describe(p)] {
			return nil, fmt.Errorf("%s: parentFileNameHint %q leads back to %s: the chain has a cycle", child.name, hint, fsys.Describe(p))
		}
		pf, err := fsys.Open(ctx, p)
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		l, err := openLayer(ctx, fsys, p, pf)
		if err != nil {
			return nil, fmt.Errorf("%s: parent: %w", child.name, err)
		}
		return l, nil
	}
	return nil, fmt.Errorf("%s: parent %q (parentFileNameHint) cannot be opened: %w", child.name, hint, firstErr)
}

// join resolves name relative to the folder of the file at rel.
func join(rel, name string) string {
	if path.IsAbs(name) {
		return name
	}
	return path.Join(path.Dir(rel), name)
}

// openLayer opens one disk: a descriptor file and its extents, or a
// monolithic extent with its embedded descriptor. It owns f.
func openLayer(ctx context.Context, fsys sources.FS, p string, f sources.File) (*layer, error) {
	l := &layer{path: p, name: fsys.Describe(p)}
	if f == nil {
		var err error
		if f, err = fsys.Open(ctx, p); err != nil {
			return nil, err
		}
	}
	var head [8]byte
	if err := readFull(f, l.name, head[:min(8, max(f.Size(), 0))], 0); err != nil {
		f.Close()
		return nil, err
	}
	err := l.open(ctx, fsys, f, head[:min(8, max(f.Size(), 0))])
	if err != nil {
		l.close()
		return nil, err
	}
	return l, nil
}

func (l *layer) open(ctx context.Context, fsys sources.FS, f sources.File, head []byte) error {
	magic := uint32(0)
	if len(head) >= 4 {
		magic = binary.LittleEndian.Uint32(head)
	}
	switch {
	case magic == magicKDMV:
		h, err := readSparseHeader(f, l.name)
		if err != nil {
			f.Close()
			return err
		}
		text, err := readEmbeddedDescriptor(f, l.name, h)
		if err != nil {
			f.Close()
			return err
		}
		if h.Capacity == 0 && text != nil {
			// qemu's reading: a header of no capacity whose descriptor
			// lists the extents acts as a descriptor file.
			f.Close()
			return l.openDescriptor(ctx, fsys, text)
		}
		if text != nil {
			if l.desc, err = ParseDescriptor(text); err != nil {
				f.Close()
				return fmt.Errorf("%s: embedded descriptor at offset %d: %w", l.name, h.DescriptorOffset*512, err)
			}
		} else {
			ct := "monolithicSparse"
			if h.Compressed() {
				ct = "streamOptimized"
			}
			l.desc = &Descriptor{CreateType: ct, ParentCID: NoParentCID, Keys: map[string]string{}}
		}
		t, err := newSparseExtent(f, l.name, h)
		if err != nil {
			f.Close()
			return err
		}
		// As qemu: the monolithic file is the extent whatever name its
		// descriptor gives, and its header gives the size.
		l.add(t, int64(h.Capacity)*512)
		l.props = sparseProps(h)
	case magic == magicCOWD:
		t, h, err := newCOWDExtent(f, l.name)
		if err != nil {
			f.Close()
			return err
		}
		l.desc = &Descriptor{CreateType: "vmfsSparse", ParentCID: NoParentCID, Keys: map[string]string{}}
		l.add(t, int64(h.Capacity)*512)
	case len(head) >= 8 && binary.LittleEndian.Uint64(head) == magicSESparse:
		t, h, err := newSESparseExtent(f, l.name)
		if err != nil {
			f.Close()
			return err
		}
		l.desc = &Descriptor{CreateType: "seSparse", ParentCID: NoParentCID, Keys: map[string]string{}}
		l.add(t, int64(h.Capacity)*512)
	default:
		if f.Size() > MaxDescriptorSize {
			f.Close()
			return fmt.Errorf("%s: not a VMDK: no sparse header magic, and at %d bytes too large for a descriptor file", l.name, f.Size())
		}
		b := make([]byte, f.Size())
		err := readFull(f, l.name, b, 0)
		f.Close()
		if err != nil {
			return err
		}
		return l.openDescriptor(ctx, fsys, b)
	}
	return nil
}

// openDescriptor parses descriptor text and opens the extents it lists.
func (l *layer) openDescriptor(ctx context.Context, fsys sources.FS, b []byte) error {
	var err error
	if l.desc, err = ParseDescriptor(b); err != nil {
		return fmt.Errorf("%s: %w", l.name, err)
	}
	for _, x := range l.desc.Extents {
		e, err := l.openExtent(ctx, fsys, x)
		if err != nil {
			return err
		}
		l.add(e, x.Sectors*512)
	}
	if len(l.exts) == 0 {
		return fmt.Errorf("%s: descriptor lists no extents", l.name)
	}
	return nil
}

func (l *layer) add(e extent, size int64) {
	l.exts = append(l.exts, placed{start: l.size, size: size, e: e})
	l.size += size
}

// openExtent opens the file of one extent line of a descriptor file.
func (l *layer) openExtent(ctx context.Context, fsys sources.FS, x ExtentLine) (extent, error) {
	where := fmt.Sprintf("%s: line %d: %s extent %q", l.name, x.Line, x.Type, x.File)
	switch x.Type {
	case "ZERO":
		return zeroExtent{}, nil
	case "VMFSRDM", "VMFSRAW":
		return nil, fmt.Errorf("%s: raw device mapping cannot be read from a file (read the mapped LUN itself)", where)
	}
	p := join(l.path, x.File)
	f, err := fsys.Open(ctx, p)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	name := fsys.Describe(p)
	var head [8]byte
	if x.Type != "FLAT" && x.Type != "VMFS" {
		if err := readFull(f, name, head[:], 0); err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", where, err)
		}
	}
	m32 := binary.LittleEndian.Uint32(head[:])
	switch {
	case x.Type == "FLAT" || x.Type == "VMFS":
		return newFlatExtent(f, name, x.Offset*512, x.Sectors*512, l.desc.HasParent()), nil
	case (x.Type == "SPARSE" || x.Type == "VMFSSPARSE") && m32 == magicKDMV:
		h, err := readSparseHeader(f, name)
		if err != nil {
			f.Close()
			return nil, err
		}
		if l.props == nil {
			l.props = sparseProps(h)
		}
		t, err := newSparseExtent(f, name, h)
		if err != nil {
			f.Close()
		}
		return t, err
	case (x.Type == "SPARSE" || x.Type == "VMFSSPARSE") && m32 == magicCOWD:
		t, _, err := newCOWDExtent(f, name)
		if err != nil {
			f.Close()
		}
		return t, err
	case x.Type == "SESPARSE":
		t, _, err := newSESparseExtent(f, name)
		if err != nil {
			f.Close()
		}
		return t, err
	}
	f.Close()
	return nil, fmt.Errorf("%s: file starts with %#08x, not a KDMV or COWD sparse header", where, m32)
}

func sparseProps(h *SparseHeader) map[string]string {
	m := map[string]string{
		"sparse_version": fmt.Sprint(h.Version),
		"grain_bytes":    fmt.Sprint(h.GrainSize * 512),
	}
	if h.Compressed() {
		m["compressed"] = "deflate"
	}
	if h.UncleanShutdown {
		m["unclean_shutdown"] = "true"
	}
	return m
}

func (l *layer) close() {
	for _, p := range l.exts {
		p.e.close()
	}
	l.exts = nil
}

// find returns the index of the extent holding byte off (< l.size).
func (l *layer) find(off int64) int {
	return sort.Search(len(l.exts), func(i int) bool { return l.exts[i].start+l.exts[i].size > off })
}

// mapRange returns the layer's own map of [off, off+n) in layer offsets,
// as segs; past the layer's size it is a hole.
func (l *layer) extents(ctx context.Context, off, n int64) ([]block.Extent, error) {
	var out []block.Extent
	end := off + n
	var segs []seg
	for pos := off; pos < end; {
		if pos >= l.size {
			out = block.Append(out, block.Extent{Off: pos, Len: end - pos, Type: block.Hole})
			break
		}
		pe := l.exts[l.find(pos)]
		m := min(end, pe.start+pe.size) - pos
		var err error
		segs, err = pe.e.mapRange(ctx, pos-pe.start, m, segs[:0])
		if err != nil {
			return nil, err
		}
		for _, s := range segs {
			out = block.Append(out, block.Extent{Off: pe.start + s.off, Len: s.n, Type: s.typ})
		}
		pos += m
	}
	return out, nil
}

// read fills p with the layer's bytes at off; below supplies holes.
func (l *layer) read(p []byte, off int64, below func(p []byte, off int64) error) error {
	end := off + int64(len(p))
	var segs []seg
	for pos := off; pos < end; {
		if pos >= l.size {
			return below(p[pos-off:], pos)
		}
		pe := l.exts[l.find(pos)]
		m := min(end, pe.start+pe.size) - pos
		var err error
		segs, err = pe.e.mapRange(context.Background(), pos-pe.start, m, segs[:0])
		if err != nil {
			return err
		}
		buf := func(a, b int64) []byte { return p[pe.start+a-off : pe.start+b-off] }
		for k := 0; k < len(segs); {
			s := segs[k]
			switch s.typ {
			case block.Data:
				j := k + 1
				for j < len(segs) && segs[j].typ == block.Data {
					j++
				}
				if err := pe.e.readData(buf(s.off, segs[j-1].off+segs[j-1].n), segs[k:j]); err != nil {
					return err
				}
				k = j
				continue
			case block.Zero:
				clear(buf(s.off, s.off+s.n))
			default:
				if err := below(buf(s.off, s.off+s.n), pe.start+s.off); err != nil {
					return err
				}
			}
			k++
		}
		pos += m
	}
	return nil
}

// Size implements block.Device.
func (c *Chain) Size() int64 { return c.size }

// ReadAt implements block.Device; it is safe for concurrent use.
func (c *Chain) ReadAt(p []byte, off int64) (int, error) {
	n, eof := block.ShortRead(p, off, c.size)
	if n == 0 {
		return 0, eof
	}
	if err := c.readLayer(0, p[:n], off); err != nil {
		return 0, err
	}
	return n, eof
}

func (c *Chain) readLayer(i int, p []byte, off int64) error {
	if i >= len(c.layers) {
		clear(p)
		return nil
	}
	return c.layers[i].read(p, off, func(q []byte, o int64) error { return c.readLayer(i+1, q, o) })
}

// Extents implements block.Device: exact across the chain, a Hole only
// where no layer has anything.
func (c *Chain) Extents(ctx context.Context, off, length int64) ([]block.Extent, error) {
	off, length = block.ClipRange(c.size, off, length)
	if length == 0 {
		return nil, nil
	}
	return c.resolved(ctx, 0, off, length)
}

func (c *Chain) resolved(ctx context.Context, i int, off, n int64) ([]block.Extent, error) {
	top, err := c.layers[i].extents(ctx, off, n)
	if err != nil || i+1 == len(c.layers) {
		return top, err
	}
	return block.Resolve(ctx, top, func(ctx context.Context, o, m int64) ([]block.Extent, error) {
		return c.resolved(ctx, i+1, o, m)
	})
}

// LayerExtents returns the map of one layer alone (0 is the top) over
// [off, off+length) of the disk: Data where that layer holds grains, Zero
// where it holds zeroed or unmapped grains (which mask its parents), and
// Hole where it has nothing and a read falls through to its parent.
//
// For a snapshot delta this is "what the guest wrote since the snapshot was
// taken": the changed areas a warm migration copies when no CBT is
// available. The result is clipped to the disk size.
func (c *Chain) LayerExtents(ctx context.Context, layer int, off, length int64) ([]block.Extent, error) {
	if layer < 0 || layer >= len(c.layers) {
		return nil, fmt.Errorf("layer %d out of range: the chain has %d", layer, len(c.layers))
	}
	off, length = block.ClipRange(c.size, off, length)
	if length == 0 {
		return nil, nil
	}
	return c.layers[layer].extents(ctx, off, length)
}

// Layers returns the chain, top first, as `info` shows it.
func (c *Chain) Layers() []sources.Layer { return c.info.Layers }

// Descriptor returns the parsed descriptor of a layer (0 is the top).
func (c *Chain) Descriptor(layer int) *Descriptor { return c.layers[layer].desc }

// Info describes the chain.
func (c *Chain) Info() sources.Info { return c.info }

// Close implements block.Device.
func (c *Chain) Close() error {
	for _, l := range c.layers {
		l.close()
	}
	c.layers = nil
	return nil
}

// describe fills c.info: one sources.Layer per layer, with its allocated
// bytes (the Data bytes it holds itself), and the top layer's properties.
func (c *Chain) describe(ctx context.Context) error {
	c.info = sources.Info{Format: "vmdk", VirtualSize: c.size}
	for i, l := range c.layers {
		var alloc int64
		for _, p := range l.exts {
			n, err := p.e.allocated(ctx, p.size)
			if err != nil {
				return err
			}
			alloc += n
		}
		d := l.desc
		ly := sources.Layer{
			File: l.name, Format: "vmdk", Subformat: d.CreateType,
			ID: fmt.Sprintf("%08x", d.CID), Allocated: alloc, Props: l.properties(),
		}
		if d.ParentFileNameHint != "" || (i == 0 && len(c.layers) > 1) {
			ly.Parent = d.ParentFileNameHint
			if i+1 < len(c.layers) && ly.Parent != c.layers[i+1].path {
				ly.Props["parent_opened"] = c.layers[i+1].name
			}
			ly.ParentID = fmt.Sprintf("%08x", d.ParentCID)
		}
		c.info.Layers = append(c.info.Layers, ly)
	}
	// Disk properties of the chain: each from the topmost layer that has it
	// (ESXi deltas carry little more than their content IDs).
	c.info.Props = map[string]string{}
	for i := len(c.layers) - 1; i >= 0; i-- {
		for k, v := range c.layers[i].properties() {
			c.info.Props[k] = v
		}
	}
	if len(c.layers) > 1 {
		c.info.Props["chain_depth"] = fmt.Sprint(len(c.layers))
	}
	return nil
}

func (l *layer) properties() map[string]string {
	d := l.desc
	m := map[string]string{"create_type": d.CreateType}
	set := func(k, v string) {
		if v != "" {
			m[k] = v
		}
	}
	set("adapter_type", d.DDB("adapterType"))
	set("hardware_version", d.DDB("virtualHWVersion"))
	if c, h, s := d.DDB("geometry.cylinders"), d.DDB("geometry.heads"), d.DDB("geometry.sectors"); c != "" || h != "" || s != "" {
		m["geometry"] = c + "/" + h + "/" + s
	}
	set("uuid", d.DDB("uuid"))
	set("long_content_id", d.DDB("longContentID"))
	set("thin_provisioned", d.DDB("thinProvisioned"))
	set("tools_version", d.DDB("toolsVersion"))
	set("change_track_path", d.ChangeTrackPath)
	set("encoding", d.Encoding)
	for k, v := range l.props {
		m[k] = v
	}
	return m
}

var _ block.Device = (*Chain)(nil)
