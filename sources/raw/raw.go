// Package raw is the raw image format: the file is the disk, byte for byte.
// It is probed last and accepts anything.
package raw

import (
	"context"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
)

// Format is the raw format.
type Format struct{}

// Name implements sources.Format.
func (Format) Name() string { return "raw" }

// Probe implements sources.Format: raw accepts every file.
func (Format) Probe([]byte, string) bool { return true }

// Open implements sources.Format.
func (Format) Open(ctx context.Context, fsys sources.FS, name string, f sources.File, _ sources.Options) (*sources.Image, error) {
	dev := NewDevice(f)
	alloc := int64(0)
	err := block.Walk(ctx, dev, 0, dev.Size(), 0, func(e block.Extent) error {
		if e.Type == block.Data {
			alloc += e.Len
		}
		return nil
	})
	if err != nil {
		f.Close()
		return nil, err
	}
	return &sources.Image{Device: dev, Info: sources.Info{
		Format:      "raw",
		VirtualSize: dev.Size(),
		Layers:      []sources.Layer{{File: fsys.Describe(name), Format: "raw", Allocated: alloc}},
	}}, nil
}

// Device is a file as a device; holes come from the file when it knows them.
type Device struct {
	block.ReaderAt
	ext sources.Extenter
	fd  uintptr // a local file's descriptor, for MapFile
	isf bool    // fd is set
}

// OpenFile opens a local raw image read-only as a device (holes from
// SEEK_DATA/SEEK_HOLE, data sent with sendfile by the NBD server).
func OpenFile(path string) (*Device, error) {
	f, err := file.Open(path)
	if err != nil {
		return nil, err
	}
	return NewDevice(f), nil
}

// NewDevice wraps a file.
func NewDevice(f sources.File) *Device {
	d := &Device{ReaderAt: block.ReaderAt{R: f, N: f.Size(), Done: f.Close}}
	d.ext, _ = f.(sources.Extenter)
	if lf, ok := f.(interface{ Fd() uintptr }); ok {
		d.fd, d.isf = lf.Fd(), true
	}
	return d
}

// MapFile implements block.FileMapper for a local file: the device is the
// file, byte for byte.
func (d *Device) MapFile(off, n int64) (uintptr, int64, bool) {
	if !d.isf || off < 0 || n < 0 || off+n > d.N {
		return 0, 0, false
	}
	return d.fd, off, true
}

// Extents implements block.Device.
func (d *Device) Extents(ctx context.Context, off, length int64) ([]block.Extent, error) {
	if d.ext == nil {
		return d.ReaderAt.Extents(ctx, off, length)
	}
	return d.ext.Extents(ctx, off, length)
}
