// Package block is the spine of vmdk2kvm: one small interface for a virtual
// disk, and the extent helpers every implementation reuses.
//
// Every source (a VMDK chain, a qcow2 file, an NBD export, a file read over
// HTTP or SSH) is a Device; every filter (copy-on-write overlay, retry,
// block-size splitting, cache) is a Device wrapping another Device; every sink
// consumes one. Nothing downstream of a Device knows where its bytes come from.
//
// A Device answers two questions: what are the bytes at an offset (ReadAt), and
// which ranges hold data at all (Extents). Extents are exact: a range reported
// as a Hole or Zero reads as zeros, so a copy may skip it without reading.
package block

import (
	"context"
	"io"
)

// ExtentType says what a range of a device holds.
type ExtentType uint8

const (
	// Data: the range may hold non-zero bytes and must be read.
	Data ExtentType = iota
	// Zero: the range is allocated (or explicitly zeroed) and reads as zeros.
	Zero
	// Hole: the range is not allocated anywhere and reads as zeros.
	Hole
)

func (t ExtentType) String() string {
	switch t {
	case Data:
		return "data"
	case Zero:
		return "zero"
	case Hole:
		return "hole"
	}
	return "unknown"
}

// ReadsZero reports whether a range of this type reads as all zeros.
func (t ExtentType) ReadsZero() bool { return t == Zero || t == Hole }

// Extent is a contiguous byte range of a device with one type.
type Extent struct {
	Off  int64      `json:"offset"`
	Len  int64      `json:"length"`
	Type ExtentType `json:"-"`
}

// End returns the offset just past the extent.
func (e Extent) End() int64 { return e.Off + e.Len }

// Device is a read-only virtual disk.
type Device interface {
	// Size is the virtual size in bytes.
	Size() int64
	// ReadAt follows io.ReaderAt. Reads past Size return io.EOF.
	io.ReaderAt
	// Extents describes [off, off+length) as sorted, contiguous, non-overlapping
	// extents that cover the range exactly (after clipping to Size).
	Extents(ctx context.Context, off, length int64) ([]Extent, error)
	Close() error
}

// FileMapper is implemented by devices that keep some of their bytes as-is
// in an open local file (a raw image), so a server can send them to a socket
// with sendfile(2) instead of reading them into memory first.
type FileMapper interface {
	// MapFile returns the descriptor and file offset of the bytes that hold
	// [off, off+n) of the device, or ok false when that range is not one
	// piece of one file. The descriptor stays the device's: do not close it.
	MapFile(off, n int64) (fd uintptr, fileOff int64, ok bool)
}

// Writer is the write half of a device: what a copy needs from its target.
type Writer interface {
	// WriteAt follows io.WriterAt.
	io.WriterAt
	// Zero makes [off, off+length) read as zeros. It may deallocate.
	Zero(off, length int64) error
	// Flush makes every write that has returned durable.
	Flush() error
}

// Writable is a device that can also be written.
type Writable interface {
	Device
	Writer
	// Trim tells the device the range is no longer needed. After Trim the range
	// reads as zeros on every device of this project (a stronger promise than
	// NBD's, so overlays and sinks stay predictable).
	Trim(off, length int64) error
}
