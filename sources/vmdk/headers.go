package vmdk

import (
	"encoding/binary"
	"fmt"
)

// Magic numbers at the start of the three binary extent formats.
const (
	magicKDMV     = 0x564d444b // "KDMV": hosted sparse (monolithicSparse, streamOptimized, ...)
	magicCOWD     = 0x44574f43 // "COWD": ESX vmfsSparse redo log
	magicSESparse = 0xcafebabe // seSparse const header
	magicSEVolat  = 0xcafecafe // seSparse volatile header
)

// KDMV header flags.
const (
	flagNewlineTest = 1 << 0
	flagRGD         = 1 << 1
	flagZeroedGTE   = 1 << 2
	flagCompressed  = 1 << 16
	flagMarkers     = 1 << 17
)

// gdAtEnd in gdOffset means "the grain directory offset is in the footer".
const gdAtEnd = ^uint64(0)

// SparseHeader is the 512-byte header of a hosted sparse extent ("KDMV").
type SparseHeader struct {
	Version           uint32
	Flags             uint32
	Capacity          uint64 // sectors
	GrainSize         uint64 // sectors
	DescriptorOffset  uint64 // sectors
	DescriptorSize    uint64 // sectors
	NumGTEsPerGT      uint32
	RGDOffset         uint64 // sectors
	GDOffset          uint64 // sectors; gdAtEnd: see the footer
	OverHead          uint64 // sectors
	UncleanShutdown   bool
	CompressAlgorithm uint16
}

// Compressed reports whether grains are deflate-compressed (streamOptimized).
// As in qemu and VMware's open-vmdk, the algorithm field decides, not the
// flag bit.
func (h *SparseHeader) Compressed() bool { return h.CompressAlgorithm == 1 }

// Markers reports whether grains carry {lba, size} markers and metadata has markers.
func (h *SparseHeader) Markers() bool { return h.Flags&flagMarkers != 0 }

// ParseSparseHeader decodes and checks a KDMV header. Every field that sizes
// memory or positions a read is range-checked here; the GD's position against
// the file size is checked by the caller, which knows the size.
func ParseSparseHeader(b []byte) (*SparseHeader, error) {
	if len(b) < 512 {
		return nil, fmt.Errorf("sparse header: %d bytes, want 512", len(b))
	}
	le := binary.LittleEndian
	if m := le.Uint32(b); m != magicKDMV {
		return nil, fmt.Errorf("sparse header: magic %#08x at offset 0, want %#08x (KDMV)", m, magicKDMV)
	}
	h := &SparseHeader{
		Version:           le.Uint32(b[4:]),
		Flags:             le.Uint32(b[8:]),
		Capacity:          le.Uint64(b[12:]),
		GrainSize:         le.Uint64(b[20:]),
		DescriptorOffset:  le.Uint64(b[28:]),
		DescriptorSize:    le.Uint64(b[36:]),
		NumGTEsPerGT:      le.Uint32(b[44:]),
		RGDOffset:         le.Uint64(b[48:]),
		GDOffset:          le.Uint64(b[56:]),
		OverHead:          le.Uint64(b[64:]),
		UncleanShutdown:   b[72] != 0,
		CompressAlgorithm: le.Uint16(b[77:]),
	}
	switch {
	case h.Version < 1 || h.Version > 3:
		return nil, fmt.Errorf("sparse header: field version (offset 4) is %d, want 1, 2 or 3", h.Version)
	case h.Capacity > maxSectors:
		return nil, fmt.Errorf("sparse header: field capacity (offset 12) is %d sectors, more than the %d supported", h.Capacity, uint64(maxSectors))
	case h.GrainSize == 0 || h.GrainSize&(h.GrainSize-1) != 0 || h.GrainSize > maxGrainSectors:
		return nil, fmt.Errorf("sparse header: field grainSize (offset 20) is %d sectors, want a power of two up to %d", h.GrainSize, maxGrainSectors)
	case h.NumGTEsPerGT == 0 || h.NumGTEsPerGT > 4096:
		return nil, fmt.Errorf("sparse header: field numGTEsPerGT (offset 44) is %d, want 1 to 4096", h.NumGTEsPerGT)
	case h.DescriptorSize > MaxDescriptorSize/512:
		return nil, fmt.Errorf("sparse header: field descriptorSize (offset 36) is %d sectors, more than %d", h.DescriptorSize, MaxDescriptorSize/512)
	case h.DescriptorOffset > maxSectors:
		return nil, fmt.Errorf("sparse header: field descriptorOffset (offset 28) is %d, out of range", h.DescriptorOffset)
	case h.GDOffset != gdAtEnd && h.GDOffset > maxSectors:
		return nil, fmt.Errorf("sparse header: field gdOffset (offset 56) is %d, out of range", h.GDOffset)
	case h.CompressAlgorithm > 1:
		return nil, fmt.Errorf("sparse header: field compressAlgorithm (offset 77) is %d, want 0 (none) or 1 (deflate)", h.CompressAlgorithm)
	}
	return h, nil
}

// maxGrainSectors bounds the grain size: 1 MiB (VMware uses 64 KiB). A grain
// is the unit buffered when inflating, so this bounds memory per read.
const maxGrainSectors = 2048

// gdEntries returns the number of GD entries a sparse header implies.
func (h *SparseHeader) gdEntries() uint64 {
	span := h.GrainSize * uint64(h.NumGTEsPerGT)
	return (h.Capacity + span - 1) / span
}

// COWDHeader is the 2048-byte header of an ESX vmfsSparse redo log ("COWD").
type COWDHeader struct {
	Version          uint32
	Flags            uint32
	Capacity         uint32 // sectors
	GrainSize        uint32 // sectors
	GDOffset         uint32 // sectors
	NumGDEntries     uint32
	NextFreeSector   uint32
	ParentFileName   string // a child's parent as the redo log names it (informational)
	ParentGeneration uint32
	Generation       uint32
	UncleanShutdown  bool
}

// cowdGTEntries is the fixed number of entries of a COWD grain table.
const cowdGTEntries = 4096

// ParseCOWDHeader decodes and checks a COWD header (2048 bytes).
func ParseCOWDHeader(b []byte) (*COWDHeader, error) {
	if len(b) < 2048 {
		return nil, fmt.Errorf("COWD header: %d bytes, want 2048", len(b))
	}
	le := binary.LittleEndian
	if m := le.Uint32(b); m != magicCOWD {
		return nil, fmt.Errorf("COWD header: magic %#08x at offset 0, want %#08x (COWD)", m, magicCOWD)
	}
	h := &COWDHeader{
		Version:          le.Uint32(b[4:]),
		Flags:            le.Uint32(b[8:]),
		Capacity:         le.Uint32(b[12:]),
		GrainSize:        le.Uint32(b[16:]),
		GDOffset:         le.Uint32(b[20:]),
		NumGDEntries:     le.Uint32(b[24:]),
		NextFreeSector:   le.Uint32(b[28:]),
		ParentGeneration: le.Uint32(b[1056:]),
		Generation:       le.Uint32(b[1060:]),
		UncleanShutdown:  b[1648] != 0,
	}
	name := b[32:1056]
	if i := indexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	h.ParentFileName = string(name)
	switch {
	case h.Version != 1:
		return nil, fmt.Errorf("COWD header: field version (offset 4) is %d, want 1", h.Version)
	case h.GrainSize == 0 || h.GrainSize&(h.GrainSize-1) != 0 || h.GrainSize > maxGrainSectors:
		return nil, fmt.Errorf("COWD header: field grainSize (offset 16) is %d sectors, want a power of two up to %d", h.GrainSize, maxGrainSectors)
	case h.GDOffset == 0:
		return nil, fmt.Errorf("COWD header: field gdOffset (offset 20) is 0")
	}
	need := (uint64(h.Capacity) + uint64(h.GrainSize)*cowdGTEntries - 1) / (uint64(h.GrainSize) * cowdGTEntries)
	if uint64(h.NumGDEntries) < need {
		return nil, fmt.Errorf("COWD header: field numGDEntries (offset 24) is %d, want at least %d for %d sectors", h.NumGDEntries, need, h.Capacity)
	}
	// A root extent holds geometry where a child holds the parent's name.
	if !printable(h.ParentFileName) {
		h.ParentFileName = ""
	}
	return h, nil
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] == 0x7f {
			return false
		}
	}
	return true
}

// SESparseHeader is the 512-byte constant header of a seSparse extent.
type SESparseHeader struct {
	Version        uint64
	Capacity       uint64 // sectors
	GrainSize      uint64 // sectors (8)
	GrainTableSize uint64 // sectors (64: 4096 u64 entries)
	Flags          uint64
	// {offset, size} in sectors of each region.
	VolatileHeader, JournalHeader, Journal, GrainDir, GrainTables, FreeBitmap, Backmap, Grains [2]uint64
}

// ParseSESparseHeader decodes and checks a seSparse const header.
func ParseSESparseHeader(b []byte) (*SESparseHeader, error) {
	if len(b) < 512 {
		return nil, fmt.Errorf("seSparse header: %d bytes, want 512", len(b))
	}
	le := binary.LittleEndian
	u := func(i int) uint64 { return le.Uint64(b[8*i:]) }
	if m := u(0); m != magicSESparse {
		return nil, fmt.Errorf("seSparse header: magic %#x at offset 0, want %#x", m, magicSESparse)
	}
	h := &SESparseHeader{Version: u(1), Capacity: u(2), GrainSize: u(3), GrainTableSize: u(4), Flags: u(5)}
	regions := []*[2]uint64{&h.VolatileHeader, &h.JournalHeader, &h.Journal, &h.GrainDir, &h.GrainTables, &h.FreeBitmap, &h.Backmap, &h.Grains}
	for i, r := range regions {
		r[0], r[1] = u(10+2*i), u(11+2*i)
		if r[0] > maxSectors || r[1] > maxSectors {
			return nil, fmt.Errorf("seSparse header: region at offset %d is {%d, %d} sectors, out of range", 80+16*i, r[0], r[1])
		}
	}
	switch {
	case h.Version != 0x200000001:
		return nil, fmt.Errorf("seSparse header: field version (offset 8) is %#x, want 0x200000001", h.Version)
	case h.Capacity > maxSectors:
		return nil, fmt.Errorf("seSparse header: field capacity (offset 16) is %d sectors, out of range", h.Capacity)
	case h.GrainSize != 8:
		return nil, fmt.Errorf("seSparse header: field grain_size (offset 24) is %d, want 8", h.GrainSize)
	case h.GrainTableSize != 64:
		return nil, fmt.Errorf("seSparse header: field grain_table_size (offset 32) is %d, want 64", h.GrainTableSize)
	case h.Flags != 0:
		return nil, fmt.Errorf("seSparse header: field flags (offset 40) is %#x, want 0", h.Flags)
	}
	return h, nil
}

// SESparseVolatile is the seSparse volatile header.
type SESparseVolatile struct {
	FreeGTNumber, NextTxnSeqNumber, ReplayJournal uint64
}

// ParseSESparseVolatile decodes a seSparse volatile header; a journal that
// must be replayed (the disk was not closed cleanly) is refused.
func ParseSESparseVolatile(b []byte) (*SESparseVolatile, error) {
	if len(b) < 32 {
		return nil, fmt.Errorf("seSparse volatile header: %d bytes, want 32", len(b))
	}
	le := binary.LittleEndian
	if m := le.Uint64(b); m != magicSEVolat {
		return nil, fmt.Errorf("seSparse volatile header: magic %#x, want %#x", m, magicSEVolat)
	}
	v := &SESparseVolatile{FreeGTNumber: le.Uint64(b[8:]), NextTxnSeqNumber: le.Uint64(b[16:]), ReplayJournal: le.Uint64(b[24:])}
	if v.ReplayJournal != 0 {
		return nil, fmt.Errorf("seSparse volatile header: field replay_journal (offset 24) is %d: the journal is dirty (the disk was not closed cleanly); consolidate or power the VM off cleanly first", v.ReplayJournal)
	}
	return v, nil
}
