package nbd

import (
	"context"
	"sync"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// extCache remembers the extents of recently read windows of a read-only
// device, so a READ finds its holes without asking the device each time
// (a sparse file costs two lseeks per question, a VMDK a table walk).
// Devices of writable exports change under writes and are never cached.
type extCache struct {
	dev   block.Device
	mu    sync.Mutex
	wins  map[int64][]block.Extent
	order []int64 // insertion order, for eviction
}

const (
	extWindow  = 64 << 20
	extWindows = 16
)

func newExtCache(dev block.Device) *extCache {
	return &extCache{dev: dev, wins: map[int64][]block.Extent{}}
}

// extents answers like dev.Extents for [off, off+n) inside the device.
func (c *extCache) extents(ctx context.Context, off, n int64) ([]block.Extent, error) {
	w := off / extWindow
	if (off+n-1)/extWindow != w {
		return c.dev.Extents(ctx, off, n) // spans windows: rare, ask directly
	}
	c.mu.Lock()
	exts, ok := c.wins[w]
	c.mu.Unlock()
	if !ok {
		start := w * extWindow
		length := min(int64(extWindow), c.dev.Size()-start)
		var err error
		exts, err = c.dev.Extents(ctx, start, length)
		if err == nil {
			err = block.Check(exts, start, length)
		}
		if err != nil {
			return nil, err
		}
		c.mu.Lock()
		if _, dup := c.wins[w]; !dup {
			if len(c.order) >= extWindows {
				delete(c.wins, c.order[0])
				c.order = c.order[1:]
			}
			c.wins[w] = exts
			c.order = append(c.order, w)
		}
		c.mu.Unlock()
	}
	return block.Clip(exts, off, n), nil
}
