package filters

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// countingReader is a slow-ish ReaderAt that counts reads per offset and can
// fail the first read at chosen offsets.
type countingReader struct {
	data   []byte
	mu     sync.Mutex
	byOff  map[int64]int
	calls  atomic.Int64
	failAt map[int64]bool
	delay  time.Duration
	closed bool
}

func newCounting(n int, seed uint64) *countingReader {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return &countingReader{data: b, byOff: map[int64]int{}, failAt: map[int64]bool{}}
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	c.calls.Add(1)
	c.mu.Lock()
	c.byOff[off]++
	fail := c.failAt[off]
	delete(c.failAt, off)
	c.mu.Unlock()
	if c.delay > 0 {
		time.Sleep(c.delay)
	}
	if fail {
		return 0, errors.New("injected failure")
	}
	if off >= int64(len(c.data)) {
		return 0, io.EOF
	}
	n := copy(p, c.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (c *countingReader) Close() error { c.closed = true; return nil }

func TestCacheMatchesSourceUnderConcurrency(t *testing.T) {
	src := newCounting(3<<20+1234, 7)
	c := NewCache(src, int64(len(src.data)), CacheOptions{BlockSize: 64 << 10, MaxBytes: 256 << 10})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, 1))
			for i := 0; i < 300; i++ {
				n := 1 + r.IntN(200<<10)
				off := r.Int64N(int64(len(src.data)) + 1000)
				buf := make([]byte, n)
				k, err := c.ReadAt(buf, off)
				end := min(off+int64(n), int64(len(src.data)))
				want := max(0, end-off)
				if int64(k) != want || (want < int64(n) && !errors.Is(err, io.EOF)) || (want == int64(n) && err != nil) {
					errs <- errors.New("wrong count or error")
					return
				}
				if want > 0 && !bytes.Equal(buf[:k], src.data[off:end]) {
					errs <- errors.New("wrong bytes")
					return
				}
			}
		}(uint64(g))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	c.mu.Lock()
	held := len(c.blocks)
	c.mu.Unlock()
	if held > c.max+8 { // at most max loaded, plus those in flight
		t.Fatalf("cache holds %d blocks, bound %d", held, c.max)
	}
	st := c.Stats()
	if st.Hits == 0 || st.Misses == 0 || st.Bypassed == 0 {
		t.Fatalf("stats %+v", st)
	}
	if err := c.Close(); err != nil || !src.closed {
		t.Fatalf("close: %v, source closed %v", err, src.closed)
	}
	if _, err := c.ReadAt(make([]byte, 1), 0); err == nil {
		t.Fatal("read after close succeeded")
	}
}

func TestCacheSequentialReadahead(t *testing.T) {
	src := newCounting(1<<20, 3)
	c := NewCache(src, 1<<20, CacheOptions{BlockSize: 64 << 10, Readahead: 2})
	defer c.Close()
	buf := make([]byte, 4096)
	for off := int64(0); off < 1<<20; off += 4096 {
		if _, err := c.ReadAt(buf, off); err != nil || !bytes.Equal(buf, src.data[off:off+4096]) {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
	c.wg.Wait()
	st := c.Stats()
	// 16 blocks: the first two are misses, readahead brings the rest.
	if st.Readaheads < 10 || st.Misses > 4 || st.Hits < 240 {
		t.Fatalf("sequential: %+v", st)
	}
	src.mu.Lock()
	defer src.mu.Unlock()
	for off, n := range src.byOff {
		if n != 1 {
			t.Fatalf("block at %d fetched %d times", off, n)
		}
	}
}

func TestCacheOneFetchPerBlock(t *testing.T) {
	src := newCounting(1<<20, 5)
	src.delay = 20 * time.Millisecond
	c := NewCache(src, 1<<20, CacheOptions{BlockSize: 256 << 10, Readahead: -1})
	defer c.Close()
	var wg sync.WaitGroup
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 100)
			c.ReadAt(buf, 300<<10)
		}()
	}
	wg.Wait()
	if n := src.calls.Load(); n != 1 {
		t.Fatalf("16 concurrent reads of one block made %d reads below", n)
	}
}

func TestCacheFailedBlockIsRetried(t *testing.T) {
	src := newCounting(1<<20, 9)
	src.failAt[128<<10] = true
	c := NewCache(src, 1<<20, CacheOptions{BlockSize: 128 << 10, Readahead: -1})
	defer c.Close()
	buf := make([]byte, 10)
	if _, err := c.ReadAt(buf, 130<<10); err == nil {
		t.Fatal("injected failure not reported")
	}
	if _, err := c.ReadAt(buf, 130<<10); err != nil || !bytes.Equal(buf, src.data[130<<10:130<<10+10]) {
		t.Fatalf("second read: %v", err)
	}
}

func TestCacheDevicePassesExtents(t *testing.T) {
	m := block.NewMemory(1<<20, 4096)
	m.WriteAt(bytes.Repeat([]byte{7}, 8192), 65536)
	d := NewCacheDevice(m, CacheOptions{BlockSize: 16 << 10})
	defer d.Close()
	ext, err := d.Extents(context.Background(), 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := m.Extents(context.Background(), 0, 1<<20)
	if len(ext) != len(want) {
		t.Fatalf("extents %v, want %v", ext, want)
	}
	buf := make([]byte, 100)
	if _, err := d.ReadAt(buf, 65536+50); err != nil || !bytes.Equal(buf, bytes.Repeat([]byte{7}, 100)) {
		t.Fatalf("read: %v", err)
	}
}
