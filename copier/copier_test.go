package copier

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/internal/diskgen"
	"github.com/vmdk2kvm/vmdk2kvm/internal/testutil"
	rawsink "github.com/vmdk2kvm/vmdk2kvm/sinks/raw"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
)

func openRaw(t *testing.T, path string) block.Device {
	t.Helper()
	f, err := file.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	d := raw.NewDevice(f)
	t.Cleanup(func() { d.Close() })
	return d
}

// TestCopyIdenticalAndSparse copies a generated disk into a raw output and
// holds the result against the source with qemu-img: identical bytes, and
// every range that reads as zero (holes and written zeros) is a hole.
func TestCopyIdenticalAndSparse(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.raw"), filepath.Join(dir, "dst.raw")
	runs, err := diskgen.Write(context.Background(), src, 96<<20, 3)
	if err != nil {
		t.Fatal(err)
	}
	dev := openRaw(t, src)
	out, err := rawsink.Create(dst, dev.Size(), false)
	if err != nil {
		t.Fatal(err)
	}
	var last Progress
	st, err := Copy(context.Background(), dev, out, Options{TargetZeroed: true, Workers: 4, ChunkSize: 1 << 20,
		Progress: func(p Progress) { last = p }, ProgressEvery: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := out.Commit(context.Background()); err != nil {
		t.Fatal(err)
	}
	testutil.Compare(t, "raw", src, "raw", dst)
	if last.Done != dev.Size() || last.Total != dev.Size() {
		t.Fatalf("final progress %+v, want done=total=%d", last, dev.Size())
	}

	var holes, zeros, data int64
	for _, r := range runs {
		switch r.Kind {
		case diskgen.Hole:
			holes += r.Len
		case diskgen.Zeros:
			zeros += r.Len
		default:
			data += r.Len
		}
	}
	if st.Read != data+zeros {
		t.Errorf("read %d bytes, want the source's allocated %d (holes must not be read)", st.Read, data+zeros)
	}
	if st.Written != data {
		t.Errorf("wrote %d bytes, want exactly the non-zero data %d", st.Written, data)
	}
	// qemu-img's map of the output: allocated only where the source has data.
	var alloc int64
	for _, e := range testutil.QemuMap(t, "raw", dst) {
		if e.Data {
			alloc += e.Length
			for _, r := range runs {
				if (r.Kind == diskgen.Hole || r.Kind == diskgen.Zeros) && r.Off < e.Start+e.Length && e.Start < r.Off+r.Len {
					t.Fatalf("output allocates [%d,+%d), which overlaps a zero run %+v", e.Start, e.Length, r)
				}
			}
		}
	}
	if alloc != data {
		t.Errorf("output allocates %d bytes, want %d", alloc, data)
	}
}

// TestCopyRangesIntoDirtyTarget copies only some ranges into a target that
// holds other bytes: those ranges (zeros included) must match the source,
// the rest must be untouched.
func TestCopyRangesIntoDirtyTarget(t *testing.T) {
	const size = 8 << 20
	src := block.NewMemory(size, 4096)
	src.WriteAt(bytes.Repeat([]byte{7}, 3<<20), 1<<20)
	src.Zero(2<<20, 256<<10) // zeros inside data
	dst := block.NewMemory(size, 4096)
	dst.WriteAt(bytes.Repeat([]byte{9}, size), 0)
	ranges := []block.Extent{{Off: 0, Len: 1 << 20}, {Off: 2 << 20, Len: 1 << 20}, {Off: 6 << 20, Len: 1 << 20}}
	if _, err := Copy(context.Background(), src, dst, Options{Ranges: ranges, ChunkSize: 128 << 10, Granule: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	got, want := make([]byte, size), make([]byte, size)
	dst.ReadAt(got, 0)
	src.ReadAt(want, 0)
	for i := 0; i < size; i++ {
		in := false
		for _, r := range ranges {
			if int64(i) >= r.Off && int64(i) < r.End() {
				in = true
			}
		}
		if in && got[i] != want[i] {
			t.Fatalf("byte %d = %d, want source's %d", i, got[i], want[i])
		}
		if !in && got[i] != 9 {
			t.Fatalf("byte %d outside the ranges was changed to %d", i, got[i])
		}
	}
}

// slow delays every read so a copy can be cancelled while it runs.
type slow struct{ block.Device }

func (s slow) ReadAt(p []byte, off int64) (int, error) {
	time.Sleep(5 * time.Millisecond)
	return s.Device.ReadAt(p, off)
}

// TestCancelLeavesNoOutput cancels a copy midway; after Abort the folder
// holds nothing but the source.
func TestCancelLeavesNoOutput(t *testing.T) {
	dir := t.TempDir()
	src := block.NewMemory(256<<20, 1<<20)
	src.WriteAt(bytes.Repeat([]byte{1}, 256<<20), 0)
	out, err := rawsink.Create(filepath.Join(dir, "out.raw"), src.Size(), false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	_, err = Copy(ctx, slow{src}, out, Options{ChunkSize: 1 << 20, Workers: 2})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if err := out.Abort(); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("folder holds %v after a cancelled copy", ents)
	}
}

// errDev fails reads past a point: the copy must stop with an error naming
// the offset.
type errDev struct{ block.Device }

func (e errDev) ReadAt(p []byte, off int64) (int, error) {
	if off >= 4<<20 {
		return 0, errors.New("medium error")
	}
	return e.Device.ReadAt(p, off)
}

func TestReadErrorNamesOffset(t *testing.T) {
	src := block.NewMemory(8<<20, 4096)
	src.WriteAt(bytes.Repeat([]byte{1}, 8<<20), 0)
	_, err := Copy(context.Background(), errDev{src}, block.NewMemory(8<<20, 4096), Options{ChunkSize: 1 << 20})
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("medium error")) || !bytes.Contains([]byte(err.Error()), []byte("offset")) {
		t.Fatalf("err = %v", err)
	}
}

// TestHugeSparseSource copies a 100 GiB device with a few data blocks: only
// the data is read, and it completes (memory is bounded by workers × chunk;
// bench/copy.sh measures peak RSS).
func TestHugeSparseSource(t *testing.T) {
	const size = 100 << 30
	src := block.NewMemory(size, 1<<20)
	for i := int64(0); i < 10; i++ {
		src.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 1<<20), i*(10<<30))
	}
	dst := block.NewMemory(size, 1<<20)
	st, err := Copy(context.Background(), src, dst, Options{TargetZeroed: true})
	if err != nil {
		t.Fatal(err)
	}
	if st.Read != 10<<20 || st.Skipped != size-10<<20 {
		t.Fatalf("stats %+v", st)
	}
	buf := make([]byte, 1<<20)
	dst.ReadAt(buf, 9*(10<<30))
	if !bytes.Equal(buf, bytes.Repeat([]byte{10}, 1<<20)) {
		t.Fatal("data block not copied")
	}
}

// BenchmarkCopyGenerated copies a generated 512 MiB disk into a raw file.
func BenchmarkCopyGenerated(b *testing.B) {
	dir := b.TempDir()
	src := filepath.Join(dir, "src.raw")
	if _, err := diskgen.Write(context.Background(), src, 512<<20, 1); err != nil {
		b.Fatal(err)
	}
	f, err := file.Open(src)
	if err != nil {
		b.Fatal(err)
	}
	dev := raw.NewDevice(f)
	defer dev.Close()
	b.SetBytes(dev.Size())
	for b.Loop() {
		out, err := rawsink.Create(filepath.Join(dir, "dst.raw"), dev.Size(), false)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := Copy(context.Background(), dev, out, Options{TargetZeroed: true}); err != nil {
			b.Fatal(err)
		}
		if err := out.Commit(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
}
