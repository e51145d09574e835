package filters

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// CacheOptions tune Cache.
type CacheOptions struct {
	// BlockSize is the aligned unit read from below (default 1 MiB). Reads
	// of at least BlockSize bytes bypass the cache: they are already large.
	BlockSize int64
	// MaxBytes bounds the memory the cache holds (default 32 MiB; at least
	// two blocks). A negative value is left to callers to mean "no cache".
	MaxBytes int64
	// Readahead is how many blocks are fetched ahead once reads are seen to
	// be sequential (default 2; negative disables).
	Readahead int
}

// CacheStats counts what a cache did.
type CacheStats struct {
	Hits       int64 `json:"hits"`       // blocks found (or already being fetched)
	Misses     int64 `json:"misses"`     // blocks fetched for a read
	Readaheads int64 `json:"readaheads"` // blocks fetched ahead of a read
	Bypassed   int64 `json:"bypassed"`   // large reads passed straight through
	BytesBelow int64 `json:"bytes_below"`
}

// Add adds o's counters to s.
func (s *CacheStats) Add(o CacheStats) {
	s.Hits += o.Hits
	s.Misses += o.Misses
	s.Readaheads += o.Readaheads
	s.Bypassed += o.Bypassed
	s.BytesBelow += o.BytesBelow
}

// Cache is a bounded read cache with readahead over an io.ReaderAt (a remote
// file, or a device through CacheDevice). Small reads are served from
// aligned blocks, each fetched once even when several readers want it at the
// same time; the least recently used blocks are dropped when the memory
// bound is reached. A block that failed to load is not kept, so the next
// read tries again.
type Cache struct {
	r    io.ReaderAt
	size int64
	opts CacheOptions
	max  int // blocks

	mu      sync.Mutex
	blocks  map[int64]*cacheBlock
	lru     list.List // of *cacheBlock, most recent first
	lastMis int64
	closed  bool
	wg      sync.WaitGroup

	hits, misses, ahead, bypass, below atomic.Int64
}

type cacheBlock struct {
	idx      int64
	data     []byte
	err      error
	ready    chan struct{}
	elem     *list.Element
	loading  bool
	prefetch bool // loaded ahead and not yet read
}

// NewCache wraps r, of the given size. The cache owns r: Close closes it
// when it is an io.Closer.
func NewCache(r io.ReaderAt, size int64, opts CacheOptions) *Cache {
	if opts.BlockSize <= 0 {
		opts.BlockSize = 1 << 20
	}
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = 32 << 20
	}
	if opts.Readahead == 0 {
		opts.Readahead = 2
	}
	return &Cache{
		r: r, size: size, opts: opts,
		max:     int(max(2, opts.MaxBytes/opts.BlockSize)),
		blocks:  map[int64]*cacheBlock{},
		lastMis: -2,
	}
}

// Size returns the size of what is cached.
func (c *Cache) Size() int64 { return c.size }

// Stats returns the counters so far.
func (c *Cache) Stats() CacheStats {
	return CacheStats{Hits: c.hits.Load(), Misses: c.misses.Load(), Readaheads: c.ahead.Load(),
		Bypassed: c.bypass.Load(), BytesBelow: c.below.Load()}
}

// Unwrap returns what the cache reads from.
func (c *Cache) Unwrap() io.ReaderAt { return c.r }

// ReadAt implements io.ReaderAt.
func (c *Cache) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("cache: read at negative offset %d", off)
	}
	if off >= c.size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), c.size-off)
	if n >= c.opts.BlockSize {
		c.bypass.Add(1)
		k, err := c.r.ReadAt(p[:n], off)
		c.below.Add(int64(k))
		if err == nil && n < int64(len(p)) {
			err = io.EOF
		}
		if errors.Is(err, io.EOF) && int64(k) == n && n == int64(len(p)) {
			err = nil
		}
		return k, err
	}
	done := int64(0)
	for done < n {
		pos := off + done
		idx := pos / c.opts.BlockSize
		data, err := c.block(idx)
		if err != nil {
			return int(done), err
		}
		in := pos - idx*c.opts.BlockSize
		if in >= int64(len(data)) {
			return int(done), fmt.Errorf("cache: block %d holds %d bytes, short of offset %d", idx, len(data), pos)
		}
		done += int64(copy(p[done:n], data[in:]))
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// block returns the data of block idx, loading it when absent.
func (c *Cache) block(idx int64) ([]byte, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, errors.New("cache: read after close")
	}
	if b, ok := c.blocks[idx]; ok {
		c.hits.Add(1)
		c.lru.MoveToFront(b.elem)
		if b.prefetch {
			b.prefetch = false
			c.readahead(idx + 1)
		}
		c.mu.Unlock()
		<-b.ready
		return b.data, b.err
	}
	c.misses.Add(1)
	b := c.insert(idx)
	if idx == c.lastMis+1 {
		c.readahead(idx + 1)
	}
	c.lastMis = idx
	c.mu.Unlock()
	c.load(b)
	return b.data, b.err
}

// insert adds an empty block, evicting the least recently used loaded ones.
// c.mu is held.
func (c *Cache) insert(idx int64) *cacheBlock {
	b := &cacheBlock{idx: idx, ready: make(chan struct{}), loading: true}
	b.elem = c.lru.PushFront(b)
	c.blocks[idx] = b
	for e := c.lru.Back(); e != nil && len(c.blocks) > c.max; {
		prev := e.Prev()
		if old := e.Value.(*cacheBlock); !old.loading {
			c.lru.Remove(e)
			delete(c.blocks, old.idx)
		}
		e = prev
	}
	return b
}

// readahead starts loading the blocks from idx on that are not present.
// c.mu is held.
func (c *Cache) readahead(idx int64) {
	last := (c.size - 1) / c.opts.BlockSize
	for i := idx; i < idx+int64(c.opts.Readahead) && i <= last; i++ {
		if _, ok := c.blocks[i]; ok {
			continue
		}
		b := c.insert(i)
		b.prefetch = true
		c.ahead.Add(1)
		c.wg.Add(1)
		go func() { defer c.wg.Done(); c.load(b) }()
	}
}

// load reads block b from below and publishes it. A failed block is removed
// so that the next read retries it.
func (c *Cache) load(b *cacheBlock) {
	start := b.idx * c.opts.BlockSize
	buf := make([]byte, min(c.opts.BlockSize, c.size-start))
	k, err := c.r.ReadAt(buf, start)
	c.below.Add(int64(k))
	if errors.Is(err, io.EOF) && k == len(buf) {
		err = nil
	}
	if err == nil && k < len(buf) {
		err = io.ErrUnexpectedEOF
	}
	c.mu.Lock()
	b.data, b.err, b.loading = buf, err, false
	if err != nil {
		b.data = nil
		if c.blocks[b.idx] == b {
			c.lru.Remove(b.elem)
			delete(c.blocks, b.idx)
		}
	}
	c.mu.Unlock()
	close(b.ready)
}

// Close waits for readahead to finish, drops the blocks and closes what the
// cache wraps when it can be closed.
func (c *Cache) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	c.wg.Wait()
	c.mu.Lock()
	c.blocks, c.lru = nil, list.List{}
	c.mu.Unlock()
	if cl, ok := c.r.(io.Closer); ok {
		return cl.Close()
	}
	return nil
}

// CacheDevice is a device whose reads go through a Cache; extents are
// passed through.
type CacheDevice struct {
	*Cache
	dev block.Device
}

// NewCacheDevice wraps d; closing the result closes d.
func NewCacheDevice(d block.Device, opts CacheOptions) *CacheDevice {
	return &CacheDevice{Cache: NewCache(d, d.Size(), opts), dev: d}
}

// Extents implements block.Device.
func (d *CacheDevice) Extents(ctx context.Context, off, length int64) ([]block.Extent, error) {
	return d.dev.Extents(ctx, off, length)
}
