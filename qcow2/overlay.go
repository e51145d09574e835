package qcow2

import (
	"context"
	"fmt"
	"os"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sinks"
)

// CreateOverlay creates an empty qcow2 image at path whose backing file is
// backingPath (stored as given: a relative name is relative to path's
// folder, as qemu reads it). backingFormat is "qcow2", "raw" or "" to probe
// and record it. The overlay has the backing file's virtual size and the
// default cluster size; it appears under path only when complete.
func CreateOverlay(path, backingPath, backingFormat string) error {
	bp := localBackingPath(path, backingPath)
	dev, err := openLocalAny(bp, backingFormat, []string{path})
	if err != nil {
		return fmt.Errorf("overlay %s: backing file: %w", path, err)
	}
	size := dev.Size()
	if backingFormat == "" {
		backingFormat = "raw"
		if _, ok := dev.(*Image); ok {
			backingFormat = "qcow2"
		}
	}
	dev.Close()
	w, err := Create(path, size, sinks.Options{})
	if err != nil {
		return err
	}
	w.backing, w.backFmt = backingPath, backingFormat
	return w.Commit(context.Background())
}

// Commit writes the clusters an overlay holds itself (data and zero
// clusters, not what shows through from below) into its backing file, a
// qcow2 image (updated in place through OpenUpdate) or a raw file. The
// overlay is left as it is: it now reads the same as its backing file plus
// nothing new. It returns the bytes committed.
func Commit(ctx context.Context, overlayPath string) (int64, error) {
	top, err := OpenFile(overlayPath)
	if err != nil {
		return 0, err
	}
	defer top.Close()
	if top.h.BackingFile == "" {
		return 0, fmt.Errorf("%s: has no backing file to commit into", overlayPath)
	}
	basePath := localBackingPath(overlayPath, top.h.BackingFile)
	var base interface {
		block.Writer
		Size() int64
		Close() error
	}
	format := top.h.BackingFormat
	if _, isQ := top.backing.(*Image); isQ || format == "qcow2" {
		// Release our read-only view before opening it read-write.
		top.backing.Close()
		top.backing = nil
		top.closers = top.closers[:1]
		b, err := OpenUpdate(basePath)
		if err != nil {
			return 0, err
		}
		if b.Size() < top.size {
			if err := b.Resize(top.size); err != nil {
				b.Close()
				return 0, err
			}
		}
		base = b
	} else {
		f, err := os.OpenFile(basePath, os.O_RDWR, 0)
		if err != nil {
			return 0, err
		}
		rf := &rawFile{f: f}
		if st, err := f.Stat(); err == nil && st.Size() < top.size {
			if err := f.Truncate(top.size); err != nil {
				f.Close()
				return 0, err
			}
		}
		base = rf
	}
	top.noBack = true
	var n int64
	buf := make([]byte, 1<<20)
	err = block.Walk(ctx, top, 0, top.size, 0, func(e block.Extent) error {
		switch e.Type {
		case block.Zero:
			n += e.Len
			return base.Zero(e.Off, e.Len)
		case block.Data:
			for pos := e.Off; pos < e.End(); {
				c := min(int64(len(buf)), e.End()-pos)
				if _, err := top.ReadAt(buf[:c], pos); err != nil {
					return err
				}
				if _, err := base.WriteAt(buf[:c], pos); err != nil {
					return err
				}
				pos += c
			}
			n += e.Len
		}
		return nil
	})
	if err == nil {
		err = base.Flush()
	}
	if cerr := base.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return n, fmt.Errorf("commit %s into %s: %w", overlayPath, basePath, err)
	}
	return n, nil
}

// rawFile is a raw base image written in place.
type rawFile struct{ f *os.File }

func (r *rawFile) WriteAt(p []byte, off int64) (int, error) { return r.f.WriteAt(p, off) }
func (r *rawFile) Zero(off, n int64) error {
	zeros := make([]byte, min(n, 1<<20))
	for pos := off; pos < off+n; {
		c := min(int64(len(zeros)), off+n-pos)
		if _, err := r.f.WriteAt(zeros[:c], pos); err != nil {
			return err
		}
		pos += c
	}
	return nil
}
func (r *rawFile) Flush() error { return r.f.Sync() }
func (r *rawFile) Size() int64 {
	st, err := r.f.Stat()
	if err != nil {
		return 0
	}
	return st.Size()
}
func (r *rawFile) Close() error { return r.f.Close() }
