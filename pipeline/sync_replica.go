package pipeline

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/qcow2"
)

// Replica is an existing replica opened for an incremental update.
type Replica interface {
	block.Writer
	Size() int64
	// Resize grows the replica; new space reads as zeros.
	Resize(size int64) error
	Close() error
}

// OpenReplica opens a replica for update: qcow2 through the qcow2 updater
// (crash-safe metadata order), raw as a plain file.
func OpenReplica(path, format string) (Replica, error) {
	switch format {
	case "qcow2":
		im, err := qcow2.OpenUpdate(path)
		if err != nil {
			return nil, fmt.Errorf("opening replica %s: %w", path, err)
		}
		return im, nil
	case "raw":
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("opening replica %s: %w", path, err)
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, err
		}
		return &rawReplica{f: f, size: st.Size()}, nil
	}
	return nil, fmt.Errorf("replica format %q: want qcow2 or raw", format)
}

// rawReplica is a sparse raw file updated in place; Zero punches holes.
type rawReplica struct {
	f    *os.File
	size int64
}

func (r *rawReplica) Size() int64 { return r.size }

func (r *rawReplica) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > r.size {
		return 0, fmt.Errorf("%s: write [%d,+%d) outside size %d", r.f.Name(), off, len(p), r.size)
	}
	return r.f.WriteAt(p, off)
}

func (r *rawReplica) Zero(off, length int64) error {
	if off < 0 || off+length > r.size {
		return fmt.Errorf("%s: zero [%d,+%d) outside size %d", r.f.Name(), off, length, r.size)
	}
	err := unix.Fallocate(int(r.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err == nil {
		return nil
	}
	zeros := make([]byte, min(length, 1<<20))
	for pos := off; pos < off+length; {
		c := min(int64(len(zeros)), off+length-pos)
		if _, err := r.f.WriteAt(zeros[:c], pos); err != nil {
			return err
		}
		pos += c
	}
	return nil
}

func (r *rawReplica) Resize(size int64) error {
	if size < r.size {
		return fmt.Errorf("%s: shrinking is not supported", r.f.Name())
	}
	if err := r.f.Truncate(size); err != nil {
		return err
	}
	r.size = size
	return nil
}

func (r *rawReplica) Flush() error { return r.f.Sync() }

func (r *rawReplica) Close() error {
	if r.f == nil {
		return nil
	}
	err := r.f.Close()
	r.f = nil
	return err
}
