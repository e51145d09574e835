// Package raw writes raw images: a sparse regular file (holes stay holes,
// zeros are punched with fallocate) written under a temporary name and
// renamed on Commit, or an existing block device written in place.
package raw

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vmdk2kvm/vmdk2kvm/internal/atomicfile"
	"github.com/vmdk2kvm/vmdk2kvm/sinks"
)

// Format is the raw output format.
type Format struct{}

// Name implements sinks.Format.
func (Format) Name() string { return "raw" }

// Create implements sinks.Format.
func (Format) Create(_ context.Context, path string, size int64, opts sinks.Options) (sinks.Output, error) {
	return Create(path, size, opts.NoSync)
}

// Output is a raw image being written.
type Output struct {
	af   *atomicfile.File // nil for a block device written in place
	f    *os.File
	size int64
	done bool
}

// Create starts a raw output at path of the given size. A regular file is
// written as a hidden temporary file in the same folder; a block device is
// written in place and must be at least size bytes. noSync skips the fsync
// of a regular file at Commit.
func Create(path string, size int64, noSync bool) (*Output, error) {
	if size < 0 {
		return nil, fmt.Errorf("%s: negative size %d", path, size)
	}
	if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0 {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return nil, err
		}
		end, err := f.Seek(0, 2)
		if err == nil && end < size {
			err = fmt.Errorf("%s: block device holds %d bytes, need %d", path, end, size)
		}
		if err != nil {
			f.Close()
			return nil, err
		}
		return &Output{f: f, size: size}, nil
	}
	af, err := atomicfile.Create(path, noSync)
	if err != nil {
		return nil, err
	}
	if err := af.Truncate(size); err != nil {
		af.Abort()
		return nil, fmt.Errorf("%s: setting size %d: %w", af.Name(), size, err)
	}
	return &Output{af: af, f: af.File, size: size}, nil
}

// TempName is the name the output is written under until Commit.
func (o *Output) TempName() string { return o.f.Name() }

// WriteAt implements block.Writer.
func (o *Output) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > o.size {
		return 0, fmt.Errorf("raw output: write [%d,+%d) outside size %d", off, len(p), o.size)
	}
	return o.f.WriteAt(p, off)
}

// Zero implements block.Writer. On a fresh file the range already reads as
// zeros, but Zero is also used on reused outputs, so it punches a hole (or
// zeroes the range on a block device).
func (o *Output) Zero(off, length int64) error {
	if length == 0 {
		return nil
	}
	return ZeroRange(o.f, off, length, o.af != nil)
}

// ZeroRange makes [off, off+length) of f read as zeros: a punched hole where
// punch is set and the file system supports it, else FALLOC_FL_ZERO_RANGE,
// else written zeros.
func ZeroRange(f *os.File, off, length int64, punch bool) error {
	fd := int(f.Fd())
	if punch {
		err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("%s: punch hole [%d,+%d): %w", f.Name(), off, length, err)
		}
	}
	if err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length); err == nil {
		return nil
	}
	buf := make([]byte, min(length, 1<<20))
	for pos := off; pos < off+length; {
		n := min(int64(len(buf)), off+length-pos)
		if _, err := f.WriteAt(buf[:n], pos); err != nil {
			return fmt.Errorf("%s: writing zeros at %d: %w", f.Name(), pos, err)
		}
		pos += n
	}
	return nil
}

// Flush implements block.Writer.
func (o *Output) Flush() error { return o.f.Sync() }

// Commit implements sinks.Output: sync, then rename into place.
func (o *Output) Commit(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		o.Abort()
		return err
	}
	if o.af != nil {
		return o.af.Commit()
	}
	if o.done {
		return errors.New("raw output: already finished")
	}
	o.done = true
	if err := o.f.Sync(); err != nil {
		o.f.Close()
		return fmt.Errorf("%s: sync: %w", o.f.Name(), err)
	}
	return o.f.Close()
}

// Abort implements sinks.Output. A block device is closed, not removed.
func (o *Output) Abort() error {
	if o.af != nil {
		return o.af.Abort()
	}
	if !o.done {
		o.done = true
		o.f.Close()
	}
	return nil
}
