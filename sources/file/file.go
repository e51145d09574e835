// Package file is the local transport: plain paths and file:// URLs. Files are
// opened read-only; a regular file reports its holes through SEEK_DATA and
// SEEK_HOLE, and a block device its size through seeking to its end.
package file

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// Transport resolves local paths.
type Transport struct{}

// Schemes implements sources.Transport.
func (Transport) Schemes() []string { return []string{"file"} }

// Locate implements sources.Transport.
func (Transport) Locate(_ context.Context, location string) (sources.FS, string, error) {
	p := location
	if strings.HasPrefix(location, "file://") {
		u, err := url.Parse(location)
		if err != nil {
			return nil, "", fmt.Errorf("%s: %w", location, err)
		}
		p = u.Path
	}
	return Dir(filepath.Dir(p)), filepath.Base(p), nil
}

// Dir is a local folder as a sources.FS.
type Dir string

// Describe implements sources.FS.
func (d Dir) Describe(name string) string { return d.path(name) }

func (d Dir) path(name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	return filepath.Join(string(d), name)
}

// Open implements sources.FS: the file is opened read-only.
func (d Dir) Open(_ context.Context, name string) (sources.File, error) {
	return Open(d.path(name))
}

// File is a local file or block device, read-only.
type File struct {
	f      *os.File
	size   int64
	sparse bool // regular file: SEEK_DATA/SEEK_HOLE are meaningful
}

// Open opens path read-only. A directory, or anything that is not a regular
// file or a block device, is refused with a clear error.
func Open(path string) (*File, error) {
	// O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused
	// below. It changes nothing for files and block devices.
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, cleanErr(err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, cleanErr(err)
	}
	out := &File{f: f}
	switch m := st.Mode(); {
	case m.IsRegular():
		out.size, out.sparse = st.Size(), true
	case m&os.ModeDevice != 0 && m&os.ModeCharDevice == 0:
		end, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: size of block device: %w", path, err)
		}
		out.size = end
	case m.IsDir():
		f.Close()
		return nil, fmt.Errorf("%s: is a directory, not a disk image", path)
	default:
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file or block device (%s)", path, m.Type())
	}
	return out, nil
}

// cleanErr turns *os.PathError into "path: reason" without the op word.
func cleanErr(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %w", pe.Path, pe.Err)
	}
	return err
}

// Name returns the path the file was opened with.
func (f *File) Name() string { return f.f.Name() }

// Size implements sources.File.
func (f *File) Size() int64 { return f.size }

// ReadAt implements io.ReaderAt.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	n, err := f.f.ReadAt(p, off)
	if err != nil && err != io.EOF {
		err = fmt.Errorf("%s: read at offset %d: %w", f.f.Name(), off, errors.Unwrap(err))
	}
	return n, err
}

// Close implements sources.File.
func (f *File) Close() error { return f.f.Close() }

// Fd returns the file descriptor (for copy_file_range and the like).
func (f *File) Fd() uintptr { return f.f.Fd() }

// Extents implements sources.Extenter with SEEK_DATA/SEEK_HOLE. Holes are
// reported as block.Hole; a filesystem without hole support reports all data.
func (f *File) Extents(ctx context.Context, off, length int64) ([]block.Extent, error) {
	off, length = block.ClipRange(f.size, off, length)
	if length == 0 {
		return nil, nil
	}
	if !f.sparse {
		return block.Whole(f.size, off, length, block.Data), nil
	}
	end := off + length
	fd := int(f.f.Fd())
	var out []block.Extent
	for pos := off; pos < end; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			data = f.size // no data past pos
		} else if err != nil {
			return nil, fmt.Errorf("%s: SEEK_DATA at %d: %w", f.f.Name(), pos, err)
		}
		data = min(data, end)
		out = block.Append(out, block.Extent{Off: pos, Len: data - pos, Type: block.Hole})
		if data >= end {
			break
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("%s: SEEK_HOLE at %d: %w", f.f.Name(), data, err)
		}
		hole = min(hole, end)
		out = block.Append(out, block.Extent{Off: data, Len: hole - data, Type: block.Data})
		pos = hole
	}
	return out, nil
}
