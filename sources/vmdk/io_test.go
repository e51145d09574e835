package vmdk

import (
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/sources"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
)

// countingFS counts the reads made through it (what a remote transport
// would turn into requests).
type countingFS struct {
	sources.FS
	calls, bytes atomic.Int64
}

func (c *countingFS) Open(ctx context.Context, name string) (sources.File, error) {
	f, err := c.FS.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	return &countingFile{File: f, fs: c}, nil
}

type countingFile struct {
	sources.File
	fs *countingFS
}

func (f *countingFile) ReadAt(p []byte, off int64) (int, error) {
	f.fs.calls.Add(1)
	n, err := f.File.ReadAt(p, off)
	f.fs.bytes.Add(int64(n))
	return n, err
}

// Opening reads the grain tables in one go, and a sequential read of the
// whole disk reads each byte of the file at most once, in one read per
// 2 MiB chunk for plain grains, two for compressed ones (the second fetches
// the tail of the last grain, whose size only its marker tells).
func TestNoReadAmplification(t *testing.T) {
	for _, sub := range []string{"monolithicSparse", "streamOptimized"} {
		t.Run(sub, func(t *testing.T) {
			img := convertTo(t, t.TempDir(), sub)
			fsys := &countingFS{FS: file.Dir(filepath.Dir(img))}
			c, err := Open(t.Context(), fsys, filepath.Base(img), nil, Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if n := fsys.calls.Load(); n > 8 {
				t.Errorf("open made %d reads, want at most 8", n)
			}
			fsys.calls.Store(0)
			fsys.bytes.Store(0)
			const chunk = 2 << 20
			buf := make([]byte, chunk)
			for off := int64(0); off < c.Size(); off += chunk {
				if _, err := c.ReadAt(buf, off); err != nil {
					t.Fatal(err)
				}
			}
			st, err := fsys.Open(t.Context(), filepath.Base(img))
			if err != nil {
				t.Fatal(err)
			}
			size := st.Size()
			st.Close()
			if b := fsys.bytes.Load(); b > size {
				t.Errorf("read %d bytes of a %d-byte file", b, size)
			}
			perChunk := int64(1)
			if sub == "streamOptimized" {
				perChunk = 2
			}
			t.Logf("%d reads, %d bytes for %d chunks of a %d-byte file", fsys.calls.Load(), fsys.bytes.Load(), c.Size()/chunk, size)
			if n, max := fsys.calls.Load(), perChunk*c.Size()/chunk+4; n > max {
				t.Errorf("%d reads for %d chunks", n, c.Size()/chunk)
			}
		})
	}
}
