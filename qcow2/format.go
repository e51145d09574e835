// Package qcow2 reads and writes QEMU's qcow2 image format (version 2 and 3,
// as described in qemu's docs/interop/qcow2.txt). One implementation of the
// on-disk structures (header, extensions, L1/L2 tables, refcounts) serves
// four users:
//
//   - Format, a sources.Format: a qcow2 file (plain, deflate or zstd
//     compressed clusters, zero clusters, a backing file of any format the
//     registry opens) as a read-only block.Device with exact extents.
//   - SinkFormat, a sinks.Format: a streaming writer for a fresh image. Data
//     clusters are allocated at the end of the file in the order writes
//     arrive (the copy engine writes from several goroutines, out of order),
//     compressed in the writing goroutine when asked; L2 tables stay in memory
//     (8 bytes per guest cluster, only for the parts of the disk written) and
//     L2, L1 and refcount structures are appended once, by Commit, after the
//     data. The file is written under a temporary name and renamed by Commit.
//   - OpenUpdate: an existing image opened read-write (block.Writable plus
//     Resize), used by incremental syncs: write, zero and trim anywhere.
//   - CreateOverlay and Commit: an empty image over a backing file, and
//     merging an overlay's own clusters back into its base.
//
// # Crash safety of the updater
//
// Between two Flush calls the updater writes only guest data to disk: in
// place into clusters it owns alone (refcount 1, the COPIED bit), or into
// new clusters appended past the end of the file, which nothing on disk
// references yet. Metadata changes (new L2 entries, zero flags, new L2
// tables, refcount changes, a grown L1 or refcount table) stay in memory
// until Flush, which writes them in this order, with an fsync after each step:
//
//  1. guest data;
//  2. the header with the dirty bit (incompatible feature bit 0) set;
//  3. refcount increments (new refcount blocks, a relocated refcount table and
//     the header pointing at it), so that no cluster is ever referenced
//     before its refcount is on disk;
//  4. L2 tables, then L1 entries (and a relocated L1 table with the header
//     pointing at it, after Resize);
//  5. refcount decrements for clusters no longer referenced (after the L2
//     change that dropped them is durable), whose space is then punched out;
//  6. the header with the dirty bit cleared.
//
// A crash between Flush calls therefore leaves the image exactly as it was
// after the last Flush (plus unreferenced data past the old end). A crash
// inside Flush leaves an image marked dirty whose only possible defects are
// leaked clusters (refcount higher than the references): `qemu-img check -r
// all`, qemu opening the image read-write, or OpenUpdate (through Repair)
// rebuilds the refcounts, and every write that returned before the last
// completed Flush reads back. Lazy refcounts are not used. Freed clusters
// are not reused; their space is given back to the file system with a
// punched hole. The tests cut the write sequence at random points, also
// losing random writes issued since the last fsync, and check all of this
// with qemu-img.
//
// Memory: the streaming writer holds 8 bytes per guest cluster of the L2
// tables it has touched, partial compressed clusters up to 64 MiB, and at
// Commit 2 bytes per host cluster for the refcounts. The reader and the
// updater cache at most 32 MiB of L2 tables (plus, for the updater, the
// tables changed since the last Flush).
package qcow2

import (
	"encoding/binary"
	"fmt"
)

// Magic is the first four bytes of a qcow2 file.
const Magic = "QFI\xfb"

// Incompatible feature bits.
const (
	IncompatDirty       = 1 << 0
	IncompatCorrupt     = 1 << 1
	IncompatDataFile    = 1 << 2
	IncompatCompression = 1 << 3
	IncompatExtendedL2  = 1 << 4
)

// Compression types (header byte 104).
const (
	CompressionDeflate = 0
	CompressionZstd    = 1
)

// L1/L2 entry bits.
const (
	flagCopied     = uint64(1) << 63
	flagCompressed = uint64(1) << 62
	flagZero       = uint64(1)
	offsetMask     = uint64(0x00fffffffffffe00) // bits 9-55
)

// Header extension types.
const (
	extEnd           = 0x00000000
	extBackingFormat = 0xe2792aca
	extFeatureNames  = 0x6803f857
	extDataFile      = 0x44415441
)

// Implementation limits, the same as qemu's: they bound every allocation
// sized by a header field.
const (
	MinClusterBits   = 9
	MaxClusterBits   = 21
	maxL1Bytes       = 32 << 20
	maxRefTableBytes = 8 << 20
	maxBackingName   = 1023
)

// Header is a parsed qcow2 header with its extensions.
type Header struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64
	CryptMethod           uint32
	L1Size                uint32
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64
	Incompatible          uint64
	Compatible            uint64
	Autoclear             uint64
	RefcountOrder         uint32
	HeaderLength          uint32
	CompressionType       uint8

	BackingFile   string // "" when there is none
	BackingFormat string // from the backing format extension
	// Unknown extensions, kept so a rewritten header preserves them.
	Extensions []Extension
}

// Extension is a header extension kept as raw bytes.
type Extension struct {
	Type uint32
	Data []byte
}

// ClusterSize returns the cluster size in bytes.
func (h *Header) ClusterSize() int64 { return 1 << h.ClusterBits }

// L2Entries returns the number of entries of one L2 table.
func (h *Header) L2Entries() int64 { return h.ClusterSize() / 8 }

// RefcountBits returns the width of a refcount entry in bits.
func (h *Header) RefcountBits() uint32 { return 1 << h.RefcountOrder }

// l1Needed returns how many L1 entries a virtual size needs.
func l1Needed(size uint64, clusterBits uint32) uint64 {
	span := uint64(1) << (2*clusterBits - 3) // bytes mapped by one L2 table
	return (size + span - 1) / span
}

// HeaderError is a malformed or unsupported header field.
type HeaderError struct {
	Field  string
	Offset int // byte offset of the field in the file
	Msg    string
}

func (e *HeaderError) Error() string {
	return fmt.Sprintf("qcow2 header field %s (byte %d): %s", e.Field, e.Offset, e.Msg)
}

func herr(field string, off int, format string, args ...any) error {
	return &HeaderError{Field: field, Offset: off, Msg: fmt.Sprintf(format, args...)}
}

// ParseHeader parses and validates a header from the first bytes of a file
// (at least the first cluster, or the whole file when it is shorter), given
// the file size. Every offset and size it accepts lies inside the file and
// within qemu's limits, so tables may be allocated from its fields.
func ParseHeader(b []byte, fileSize int64) (*Header, error) {
	if len(b) < 72 || string(b[:4]) != Magic {
		return nil, herr("magic", 0, "not a qcow2 image")
	}
	be := binary.BigEndian
	h := &Header{
		Version:               be.Uint32(b[4:]),
		BackingFileOffset:     be.Uint64(b[8:]),
		BackingFileSize:       be.Uint32(b[16:]),
		ClusterBits:           be.Uint32(b[20:]),
		Size:                  be.Uint64(b[24:]),
		CryptMethod:           be.Uint32(b[32:]),
		L1Size:                be.Uint32(b[36:]),
		L1TableOffset:         be.Uint64(b[40:]),
		RefcountTableOffset:   be.Uint64(b[48:]),
		RefcountTableClusters: be.Uint32(b[56:]),
		NbSnapshots:           be.Uint32(b[60:]),
		SnapshotsOffset:       be.Uint64(b[64:]),
		RefcountOrder:         4,
		HeaderLength:          72,
	}
	switch h.Version {
	case 2:
	case 3:
		if len(b) < 104 {
			return nil, herr("header_length", 100, "file too short for a version 3 header")
		}
		h.Incompatible = be.Uint64(b[72:])
		h.Compatible = be.Uint64(b[80:])
		h.Autoclear = be.Uint64(b[88:])
		h.RefcountOrder = be.Uint32(b[96:])
		h.HeaderLength = be.Uint32(b[100:])
		if h.HeaderLength < 104 || h.HeaderLength%8 != 0 {
			return nil, herr("header_length", 100, "%d is not a multiple of 8 of at least 104", h.HeaderLength)
		}
	default:
		return nil, herr("version", 4, "unsupported version %d (want 2 or 3)", h.Version)
	}
	if h.ClusterBits < MinClusterBits || h.ClusterBits > MaxClusterBits {
		return nil, herr("cluster_bits", 20, "%d outside %d..%d", h.ClusterBits, MinClusterBits, MaxClusterBits)
	}
	cs := h.ClusterSize()
	if int64(h.HeaderLength) > cs || int(h.HeaderLength) > len(b) {
		return nil, herr("header_length", 100, "%d does not fit the first cluster", h.HeaderLength)
	}
	if h.Version == 3 && h.HeaderLength > 104 {
		h.CompressionType = b[104]
	}
	if h.CryptMethod != 0 {
		return nil, herr("crypt_method", 32, "encrypted images (method %d) are not supported", h.CryptMethod)
	}
	if unknown := h.Incompatible &^ (IncompatDirty | IncompatCorrupt | IncompatDataFile | IncompatCompression | IncompatExtendedL2); unknown != 0 {
		return nil, herr("incompatible_features", 72, "unknown feature bits %#x", unknown)
	}
	if h.Incompatible&IncompatDataFile != 0 {
		return nil, herr("incompatible_features", 72, "external data files are not supported")
	}
	if h.Incompatible&IncompatExtendedL2 != 0 {
		return nil, herr("incompatible_features", 72, "extended L2 entries (subclusters) are not supported")
	}
	if h.Incompatible&IncompatCompression != 0 {
		if h.CompressionType == 0 {
			return nil, herr("compression_type", 104, "compression type bit set but compression_type is 0")
		}
	} else if h.CompressionType != 0 {
		return nil, herr("compression_type", 104, "compression_type %d without the compression type feature bit", h.CompressionType)
	}
	if h.CompressionType > CompressionZstd {
		return nil, herr("compression_type", 104, "unknown compression type %d", h.CompressionType)
	}
	if h.RefcountOrder > 6 {
		return nil, herr("refcount_order", 96, "%d exceeds 6", h.RefcountOrder)
	}
	if h.Size > 1<<62 {
		return nil, herr("size", 24, "virtual size %d is absurd", h.Size)
	}
	if uint64(h.L1Size)*8 > maxL1Bytes {
		return nil, herr("l1_size", 36, "%d entries exceed the 32 MiB limit", h.L1Size)
	}
	if uint64(h.L1Size) < l1Needed(h.Size, h.ClusterBits) {
		return nil, herr("l1_size", 36, "%d entries cannot map virtual size %d", h.L1Size, h.Size)
	}
	if err := checkArea("l1_table_offset", 40, h.L1TableOffset, uint64(h.L1Size)*8, cs, fileSize); err != nil {
		return nil, err
	}
	if uint64(h.RefcountTableClusters)*uint64(cs) > maxRefTableBytes {
		return nil, herr("refcount_table_clusters", 56, "%d clusters exceed the 8 MiB limit", h.RefcountTableClusters)
	}
	if err := checkArea("refcount_table_offset", 48, h.RefcountTableOffset, uint64(h.RefcountTableClusters)*uint64(cs), cs, fileSize); err != nil {
		return nil, err
	}
	if h.RefcountTableClusters == 0 {
		return nil, herr("refcount_table_clusters", 56, "no refcount table")
	}
	if h.NbSnapshots > 65536 {
		return nil, herr("nb_snapshots", 60, "%d snapshots is more than qemu allows", h.NbSnapshots)
	}
	if h.BackingFileOffset != 0 {
		if h.BackingFileSize == 0 || h.BackingFileSize > maxBackingName {
			return nil, herr("backing_file_size", 16, "%d outside 1..%d", h.BackingFileSize, maxBackingName)
		}
		end := h.BackingFileOffset + uint64(h.BackingFileSize)
		if h.BackingFileOffset < uint64(h.HeaderLength) || end > uint64(cs) || end > uint64(len(b)) {
			return nil, herr("backing_file_offset", 8, "name at %d+%d lies outside the first cluster", h.BackingFileOffset, h.BackingFileSize)
		}
		h.BackingFile = string(b[h.BackingFileOffset:end])
	}
	if h.Version == 3 {
		if err := h.parseExtensions(b); err != nil {
			return nil, err
		}
	}
	return h, nil
}

func checkArea(field string, at int, off, length uint64, cs, fileSize int64) error {
	if off%uint64(cs) != 0 {
		return herr(field, at, "%d is not cluster aligned", off)
	}
	if off == 0 && length > 0 {
		return herr(field, at, "table at offset 0 overlaps the header")
	}
	if off > uint64(fileSize) || length > uint64(fileSize)-off {
		return herr(field, at, "table [%d,+%d) lies past the end of the file (%d bytes)", off, length, fileSize)
	}
	return nil
}

func (h *Header) parseExtensions(b []byte) error {
	limit := len(b)
	if int64(limit) > h.ClusterSize() {
		limit = int(h.ClusterSize())
	}
	if h.BackingFileOffset != 0 && int(h.BackingFileOffset) < limit {
		limit = int(h.BackingFileOffset)
	}
	be := binary.BigEndian
	for pos := int(h.HeaderLength); ; {
		if pos+8 > limit {
			return herr("header extension", pos, "extension area runs past %d without an end marker", limit)
		}
		typ, n := be.Uint32(b[pos:]), int(be.Uint32(b[pos+4:]))
		if typ == extEnd {
			return nil
		}
		if n < 0 || n > limit-pos-8 {
			return herr("header extension", pos, "extension %#x of %d bytes runs past %d", typ, n, limit)
		}
		data := b[pos+8 : pos+8+n]
		switch typ {
		case extBackingFormat:
			h.BackingFormat = string(data)
		case extDataFile:
			return herr("header extension", pos, "external data file extension is not supported")
		case extFeatureNames:
			// Informational only; regenerated when we write a header.
		default:
			h.Extensions = append(h.Extensions, Extension{Type: typ, Data: append([]byte(nil), data...)})
		}
		pos += 8 + (n+7)&^7
	}
}

// MarshalHeader encodes a version 3 header (112 bytes with the compression
// type), its extensions and the backing file name into one cluster-sized
// buffer. It fills HeaderLength and BackingFileOffset/Size.
func (h *Header) MarshalHeader() ([]byte, error) {
	cs := h.ClusterSize()
	b := make([]byte, cs)
	be := binary.BigEndian
	h.Version = 3
	h.HeaderLength = 112
	if h.CompressionType != 0 {
		h.Incompatible |= IncompatCompression
	} else {
		h.Incompatible &^= IncompatCompression
	}
	b[104] = h.CompressionType
	pos := int(h.HeaderLength)
	put := func(typ uint32, data []byte) error {
		if pos+8+len(data)+8 > len(b) {
			return fmt.Errorf("qcow2 header extensions do not fit one %d-byte cluster", cs)
		}
		be.PutUint32(b[pos:], typ)
		be.PutUint32(b[pos+4:], uint32(len(data)))
		copy(b[pos+8:], data)
		pos += 8 + (len(data)+7)&^7
		return nil
	}
	if h.BackingFormat != "" {
		if err := put(extBackingFormat, []byte(h.BackingFormat)); err != nil {
			return nil, err
		}
	}
	for _, e := range h.Extensions {
		if err := put(e.Type, e.Data); err != nil {
			return nil, err
		}
	}
	pos += 8 // end marker (zeros)
	h.BackingFileOffset, h.BackingFileSize = 0, 0
	if h.BackingFile != "" {
		if len(h.BackingFile) > maxBackingName || pos+len(h.BackingFile) > len(b) {
			return nil, fmt.Errorf("qcow2 backing file name of %d bytes does not fit the header", len(h.BackingFile))
		}
		h.BackingFileOffset, h.BackingFileSize = uint64(pos), uint32(len(h.BackingFile))
		copy(b[pos:], h.BackingFile)
	}
	h.encodeFixed(b)
	return b, nil
}

// encodeFixed writes the fixed fields (bytes 0-103) of a version 3 header.
func (h *Header) encodeFixed(b []byte) {
	be := binary.BigEndian
	copy(b, Magic)
	be.PutUint32(b[4:], h.Version)
	be.PutUint64(b[8:], h.BackingFileOffset)
	be.PutUint32(b[16:], h.BackingFileSize)
	be.PutUint32(b[20:], h.ClusterBits)
	be.PutUint64(b[24:], h.Size)
	be.PutUint32(b[32:], h.CryptMethod)
	be.PutUint32(b[36:], h.L1Size)
	be.PutUint64(b[40:], h.L1TableOffset)
	be.PutUint64(b[48:], h.RefcountTableOffset)
	be.PutUint32(b[56:], h.RefcountTableClusters)
	be.PutUint32(b[60:], h.NbSnapshots)
	be.PutUint64(b[64:], h.SnapshotsOffset)
	be.PutUint64(b[72:], h.Incompatible)
	be.PutUint64(b[80:], h.Compatible)
	be.PutUint64(b[88:], h.Autoclear)
	be.PutUint32(b[96:], h.RefcountOrder)
	be.PutUint32(b[100:], h.HeaderLength)
}

// clusterKind classifies an L2 entry.
type clusterKind uint8

const (
	kindUnallocated clusterKind = iota // read from the backing file, or zeros
	kindZero                           // reads zeros (zero flag), maybe with a preallocated host cluster
	kindNormal                         // data at a host cluster
	kindCompressed                     // compressed data at a host byte range
)

// entry is a decoded L2 entry.
type entry struct {
	kind   clusterKind
	host   uint64 // host offset (normal, zero with preallocation, compressed)
	length int64  // compressed: bytes to read from host (up to the last sector)
	copied bool
}

// decodeL2 decodes one L2 entry. v2 images have no zero flag.
func decodeL2(e uint64, clusterBits uint32, version uint32) (entry, error) {
	if e&flagCompressed != 0 {
		x := 62 - (clusterBits - 8)
		host := e & (uint64(1)<<x - 1)
		nsect := (e >> x) & (uint64(1)<<(clusterBits-8) - 1)
		end := (host&^511 + (nsect+1)*512)
		return entry{kind: kindCompressed, host: host, length: int64(end - host)}, nil
	}
	host := e & offsetMask
	if e&flagZero != 0 && version >= 3 {
		return entry{kind: kindZero, host: host, copied: e&flagCopied != 0}, nil
	}
	if host == 0 {
		if e&flagCopied != 0 {
			return entry{}, fmt.Errorf("L2 entry %#x: host offset 0 with the COPIED bit", e)
		}
		return entry{kind: kindUnallocated}, nil
	}
	if host&(uint64(1)<<clusterBits-1) != 0 {
		return entry{}, fmt.Errorf("L2 entry %#x: host offset %#x is not cluster aligned", e, host)
	}
	return entry{kind: kindNormal, host: host, copied: e&flagCopied != 0}, nil
}

// encodeCompressed builds a compressed cluster descriptor for n bytes at host.
func encodeCompressed(host uint64, n int64, clusterBits uint32) uint64 {
	x := 62 - (clusterBits - 8)
	end := host + uint64(n)
	nsect := (end+511)/512 - host/512 - 1
	return flagCompressed | nsect<<x | host
}

// refcount reads entry i of a refcount block.
func getRefcount(blk []byte, i int64, order uint32) uint64 {
	switch order {
	case 0, 1, 2:
		bits := int64(1) << order
		per := 8 / bits
		shift := uint((i % per) * bits)
		return uint64(blk[i/per]>>shift) & (1<<bits - 1)
	case 3:
		return uint64(blk[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(blk[2*i:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(blk[4*i:]))
	default:
		return binary.BigEndian.Uint64(blk[8*i:])
	}
}

// setRefcount writes entry i of a refcount block; v must fit the width.
func setRefcount(blk []byte, i int64, order uint32, v uint64) {
	switch order {
	case 0, 1, 2:
		bits := int64(1) << order
		per := 8 / bits
		shift := uint((i % per) * bits)
		mask := byte(1<<bits-1) << shift
		blk[i/per] = blk[i/per]&^mask | byte(v)<<shift&mask
	case 3:
		blk[i] = byte(v)
	case 4:
		binary.BigEndian.PutUint16(blk[2*i:], uint16(v))
	case 5:
		binary.BigEndian.PutUint32(blk[4*i:], uint32(v))
	default:
		binary.BigEndian.PutUint64(blk[8*i:], v)
	}
}
