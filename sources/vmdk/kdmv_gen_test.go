package vmdk

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"sort"
	"testing"
)

// kdmvSpec describes a hosted sparse file to generate.
type kdmvSpec struct {
	capacity uint64 // sectors
	grain    uint64 // sectors
	perGT    uint32
	zeroed   bool // zeroed-grain GTEs (flags bit 2): nil grains become GTE 1
	stream   bool // compressed grains with markers, GD at end (footer), like layout (b)
	progress bool // a PROGRESS marker (type 4) between grains
	grains   map[uint64][]byte
}

// writeKDMV writes a monolithic hosted sparse file from the format (header,
// embedded descriptor, GD, GTs, grains; or for a stream, grains with
// markers, GT/GD markers, footer and EOS).
func writeKDMV(t testing.TB, p string, s kdmvSpec) {
	t.Helper()
	le := binary.LittleEndian
	perGTBytes := uint64(s.perGT) * 4
	gtSectors := (perGTBytes + 511) / 512
	nGT := (s.capacity + s.grain*uint64(s.perGT) - 1) / (s.grain * uint64(s.perGT))
	gdSectors := (nGT*4 + 511) / 512
	ct := "monolithicSparse"
	if s.stream {
		ct = "streamOptimized"
	}
	desc := fmt.Sprintf("# Disk DescriptorFile\nversion=1\nCID=0badcafe\nparentCID=ffffffff\ncreateType=%q\nRW %d SPARSE \"other-name.vmdk\"\n#DDB\nddb.adapterType = \"lsilogic\"\n", ct, s.capacity)
	descOff, descSectors := uint64(1), uint64(4)
	var idx []uint64
	for g := range s.grains {
		idx = append(idx, g)
	}
	sort.Slice(idx, func(i, j int) bool { return idx[i] < idx[j] })

	hdr := func(gdOff, overhead uint64) []byte {
		h := make([]byte, 512)
		copy(h, "KDMV")
		flags := uint32(1)
		if s.zeroed {
			flags |= 4
		}
		ver := uint32(1)
		if s.zeroed {
			ver = 2
		}
		if s.stream {
			flags |= 1<<16 | 1<<17
			ver = 3
			le.PutUint16(h[77:], 1)
		}
		le.PutUint32(h[4:], ver)
		le.PutUint32(h[8:], flags)
		le.PutUint64(h[12:], s.capacity)
		le.PutUint64(h[20:], s.grain)
		le.PutUint64(h[28:], descOff)
		le.PutUint64(h[36:], descSectors)
		le.PutUint32(h[44:], s.perGT)
		le.PutUint64(h[56:], gdOff)
		le.PutUint64(h[64:], overhead)
		copy(h[73:], "\n \r\n")
		return h
	}
	var f bytes.Buffer
	pad := func() { f.Write(make([]byte, (512-f.Len()%512)%512)) }
	gd := make([]byte, gdSectors*512)
	gts := make([][]byte, nGT)
	for i := range gts {
		gts[i] = make([]byte, gtSectors*512)
	}
	setGTE := func(g uint64, v uint32) { le.PutUint32(gts[g/uint64(s.perGT)][4*(g%uint64(s.perGT)):], v) }
	used := make([]bool, nGT)
	for _, g := range idx {
		used[g/uint64(s.perGT)] = true
	}
	if !s.stream {
		gdOff := descOff + descSectors
		next := gdOff + gdSectors
		gtAt := make([]uint64, nGT)
		for i := range gts {
			if used[i] {
				gtAt[i] = next
				le.PutUint32(gd[4*i:], uint32(next))
				next += gtSectors
			}
		}
		overhead := next
		f.Write(hdr(gdOff, overhead))
		d := make([]byte, descSectors*512)
		copy(d, desc)
		f.Write(d)
		f.Write(gd)
		for i := range gts {
			if used[i] {
				f.Write(gts[i]) // placeholder, rewritten below
			}
		}
		for _, g := range idx {
			if s.grains[g] == nil {
				setGTE(g, 1)
				continue
			}
			setGTE(g, uint32(next))
			b := make([]byte, s.grain*512)
			copy(b, s.grains[g])
			f.Write(b)
			next += s.grain
		}
		out := f.Bytes()
		for i := range gts {
			if used[i] {
				copy(out[gtAt[i]*512:], gts[i])
			}
		}
		writeFile(t, p, out)
		return
	}
	// Stream: header (GD at end), descriptor, then grains, GTs, GD, footer, EOS.
	f.Write(hdr(gdAtEnd, descOff+descSectors))
	d := make([]byte, descSectors*512)
	copy(d, desc)
	f.Write(d)
	marker := func(n uint64, typ uint32) {
		m := make([]byte, 512)
		le.PutUint64(m, n)
		le.PutUint32(m[12:], typ)
		f.Write(m)
	}
	for k, g := range idx {
		setGTE(g, uint32(f.Len()/512))
		var z bytes.Buffer
		w := zlib.NewWriter(&z)
		b := make([]byte, s.grain*512)
		copy(b, s.grains[g])
		w.Write(b)
		w.Close()
		var m [12]byte
		le.PutUint64(m[:], g*s.grain)
		le.PutUint32(m[8:], uint32(z.Len()))
		f.Write(m[:])
		f.Write(z.Bytes())
		pad()
		if s.progress && k == len(idx)/2 {
			marker(1, 4)
			f.Write(bytes.Repeat([]byte{0xee}, 512))
		}
	}
	for i := range gts {
		if used[i] {
			marker(gtSectors, 1)
			le.PutUint32(gd[4*i:], uint32(f.Len()/512))
			f.Write(gts[i])
		}
	}
	marker(gdSectors, 2)
	gdOff := uint64(f.Len() / 512)
	f.Write(gd)
	marker(1, 3)
	f.Write(hdr(gdOff, descOff+descSectors))
	marker(0, 0)
	writeFile(t, p, f.Bytes())
}

// Hosted sparse files with grain sizes qemu-img does not write, zeroed
// grains, and a stream with its GD in the footer and a PROGRESS marker,
// all read like qemu-img reads them.
func TestGeneratedKDMV(t *testing.T) {
	grains := func(grain uint64, zero bool) map[uint64][]byte {
		m := map[uint64][]byte{}
		for _, g := range []uint64{0, 1, 2, 7, 100, 511, 512, 513, 2000} {
			m[g] = pattern(int64(grain*512), byte(g))
		}
		if zero {
			m[3], m[600] = nil, nil
		}
		return m
	}
	cases := []kdmvSpec{
		{capacity: 40000, grain: 8, perGT: 512, grains: grains(8, false)},
		{capacity: 70001, grain: 16, perGT: 128, zeroed: true, grains: grains(16, true)},
		{capacity: 300000, grain: 128, perGT: 512, grains: grains(128, false)},
		{capacity: 300000, grain: 128, perGT: 512, stream: true, progress: true, grains: grains(128, false)},
		{capacity: 40000, grain: 8, perGT: 512, stream: true, grains: grains(8, false)},
	}
	for _, s := range cases {
		t.Run(fmt.Sprintf("grain%d-gt%d-zeroed%v-stream%v", s.grain, s.perGT, s.zeroed, s.stream), func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "gen.vmdk")
			writeKDMV(t, p, s)
			c := checkOracle(t, p, Options{})
			if c.Size() != int64(s.capacity)*512 {
				t.Fatalf("size %d", c.Size())
			}
		})
	}
}
