package block

import (
	"context"
	"fmt"
	"io"
	"sort"
	"sync"
)

// Memory is a sparse, writable, in-memory device, like nbdkit's memory plugin.
// It stores fixed-size pages; an absent page is a Hole, a page zeroed by Zero
// is a Zero extent until written. Tests use it as the plain model that other
// devices are held against; the COW filter may use it to hold small overlays.
type Memory struct {
	mu    sync.RWMutex
	size  int64
	page  int64
	pages map[int64][]byte // nil slice = zero page
}

// NewMemory returns an empty device of the given size. page is the allocation
// granularity (a power of two; 0 means 4 KiB).
func NewMemory(size, page int64) *Memory {
	if page <= 0 {
		page = 4096
	}
	return &Memory{size: size, page: page, pages: map[int64][]byte{}}
}

// Size implements Device.
func (m *Memory) Size() int64 { m.mu.RLock(); defer m.mu.RUnlock(); return m.size }

// ReadAt implements Device.
func (m *Memory) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	n, eof := ShortRead(p, off, m.size)
	for done := 0; done < n; {
		pos := off + int64(done)
		idx, in := pos/m.page, pos%m.page
		c := int(min(int64(n-done), m.page-in))
		if pg, ok := m.pages[idx]; ok && pg != nil {
			copy(p[done:done+c], pg[in:])
		} else {
			clear(p[done : done+c])
		}
		done += c
	}
	return n, eof
}

// WriteAt implements Writer. Writes past the size fail.
func (m *Memory) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > m.size {
		return 0, fmt.Errorf("memory device: write [%d,+%d) outside size %d", off, len(p), m.size)
	}
	for done := 0; done < len(p); {
		pos := off + int64(done)
		idx, in := pos/m.page, pos%m.page
		c := int(min(int64(len(p)-done), m.page-in))
		pg := m.pages[idx]
		if pg == nil {
			pg = make([]byte, m.page)
			m.pages[idx] = pg
		}
		copy(pg[in:], p[done:done+c])
		done += c
	}
	return len(p), nil
}

func (m *Memory) clearRange(off, length int64, keep bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || length < 0 || off+length > m.size {
		return fmt.Errorf("memory device: range [%d,+%d) outside size %d", off, length, m.size)
	}
	for pos, end := off, off+length; pos < end; {
		idx, in := pos/m.page, pos%m.page
		c := min(end-pos, m.page-in)
		pg, ok := m.pages[idx]
		switch {
		case in == 0 && c == m.page && keep:
			m.pages[idx] = nil
		case in == 0 && c == m.page:
			delete(m.pages, idx)
		case ok && pg != nil:
			clear(pg[in : in+c])
		case !ok && keep:
			// A partial zero of a hole page: the page reads zero either way,
			// but the range is now allocated.
			m.pages[idx] = make([]byte, m.page)
		}
		pos += c
	}
	return nil
}

// Zero implements Writer: the range becomes allocated zeros.
func (m *Memory) Zero(off, length int64) error { return m.clearRange(off, length, true) }

// Trim implements Writable: whole pages become holes, partial pages zeros.
func (m *Memory) Trim(off, length int64) error { return m.clearRange(off, length, false) }

// Flush implements Writer.
func (m *Memory) Flush() error { return nil }

// Close implements Device.
func (m *Memory) Close() error { return nil }

// Resize changes the size; pages past the new end are dropped.
func (m *Memory) Resize(size int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for idx := range m.pages {
		if idx*m.page >= size {
			delete(m.pages, idx)
		}
	}
	m.size = size
}

// Extents implements Device with page granularity.
func (m *Memory) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	off, length = ClipRange(m.size, off, length)
	var out []Extent
	end := off + length
	// Walk allocated pages in order; cheap for sparse maps and small ranges.
	idxs := make([]int64, 0, len(m.pages))
	for idx := range m.pages {
		if idx*m.page < end && (idx+1)*m.page > off {
			idxs = append(idxs, idx)
		}
	}
	sort.Slice(idxs, func(i, j int) bool { return idxs[i] < idxs[j] })
	pos := off
	for _, idx := range idxs {
		s, e := max(idx*m.page, off), min((idx+1)*m.page, end)
		out = Append(out, Extent{Off: pos, Len: s - pos, Type: Hole})
		t := Data
		if m.pages[idx] == nil {
			t = Zero
		}
		out = Append(out, Extent{Off: s, Len: e - s, Type: t})
		pos = e
	}
	out = Append(out, Extent{Off: pos, Len: end - pos, Type: Hole})
	return out, nil
}

// ReaderAt adapts a plain io.ReaderAt of known size into a Device whose
// whole range is Data: the right answer for a transport that cannot say more.
type ReaderAt struct {
	R    io.ReaderAt
	N    int64
	Done func() error // called by Close; may be nil
}

// Size implements Device.
func (r *ReaderAt) Size() int64 { return r.N }

// ReadAt implements Device, clipped to the size.
func (r *ReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, eof := ShortRead(p, off, r.N)
	if n == 0 {
		return 0, eof
	}
	m, err := r.R.ReadAt(p[:n], off)
	if err == io.EOF && m == n {
		err = nil
	}
	if err == nil {
		err = eof
	}
	return m, err
}

// Extents implements Device.
func (r *ReaderAt) Extents(_ context.Context, off, length int64) ([]Extent, error) {
	return Whole(r.N, off, length, Data), nil
}

// Close implements Device.
func (r *ReaderAt) Close() error {
	if r.Done != nil {
		return r.Done()
	}
	return nil
}
