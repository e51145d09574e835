// Package copier is the copy engine: it copies a block.Device into a
// block.Writer driven by the source's Extents.
//
// Holes and zero extents are never read: on a target that already reads as
// zeros (a fresh output) they are skipped, otherwise they become one Zero call.
// Data extents are cut into chunks and read in parallel by a bounded pool of
// workers, each owning one buffer, so memory is Workers × ChunkSize whatever
// the disk size. Inside data, all-zero granules are not written (or are
// zeroed on a non-fresh target), so a thick disk full of zeros stays sparse.
// Writes reach the target out of order; targets must accept that.
package copier

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// Options tune a copy. The zero value is a sensible default.
type Options struct {
	// Workers is the number of parallel readers (default: max(4, 2×CPUs)).
	Workers int
	// ChunkSize is the largest single read (default 2 MiB).
	ChunkSize int64
	// Granule is the size of the aligned blocks checked for zeros inside data
	// (a power of two dividing ChunkSize). Default: the target's
	// PreferredGranule when it has one (a qcow2 cluster), else 4 KiB, as
	// qemu-img's -S default.
	Granule int64
	// TargetZeroed says the target already reads as zeros everywhere, so holes
	// and zeros need no write at all.
	TargetZeroed bool
	// Ranges, when set, limits the copy to these sorted, non-overlapping
	// ranges (an incremental sync); otherwise the whole device is copied.
	Ranges []block.Extent
	// Progress, when set, is called about every ProgressEvery and once at the
	// end, from one goroutine.
	Progress      func(Progress)
	ProgressEvery time.Duration
	// ExtentWindow bounds how much of the map is asked for at once (default 1 GiB).
	ExtentWindow int64
}

// Progress is a snapshot of a running copy.
type Progress struct {
	Done  int64 // bytes processed (read, zeroed or skipped)
	Total int64 // bytes to process
	Read  int64 // bytes read from the source
}

// Stats says what a copy did.
type Stats struct {
	Total    int64         `json:"total_bytes"`    // bytes of the device covered
	Read     int64         `json:"read_bytes"`     // bytes read from the source
	Written  int64         `json:"written_bytes"`  // bytes written as data
	Zeroed   int64         `json:"zeroed_bytes"`   // bytes made zero with Zero calls
	Skipped  int64         `json:"skipped_bytes"`  // holes and zeros not touched
	Detected int64         `json:"detected_zeros"` // bytes read that turned out all-zero
	Elapsed  time.Duration `json:"elapsed_ns"`
}

// Granular is implemented by targets that prefer zero detection (and so
// writes) aligned to their own allocation unit, such as a qcow2 cluster.
type Granular interface {
	PreferredGranule() int64
}

type job struct {
	off, n int64
	typ    block.ExtentType
}

type counters struct {
	done, read, written, zeroed, skipped, detected atomic.Int64
}

// Copy copies src into dst. It does not flush dst: the caller commits.
func Copy(ctx context.Context, src block.Device, dst block.Writer, opts Options) (Stats, error) {
	start := time.Now()
	if g, ok := dst.(Granular); ok && opts.Granule <= 0 {
		opts.Granule = g.PreferredGranule()
	}
	opts = withDefaults(opts)
	ranges := opts.Ranges
	if ranges == nil {
		ranges = []block.Extent{{Off: 0, Len: src.Size()}}
	}
	var total int64
	for _, r := range ranges {
		_, n := block.ClipRange(src.Size(), r.Off, r.Len)
		total += n
	}

	var c counters
	g, gctx := errgroup.WithContext(ctx)
	jobs := make(chan job, opts.Workers)

	g.Go(func() error {
		defer close(jobs)
		for _, r := range ranges {
			err := block.Walk(gctx, src, r.Off, r.Len, opts.ExtentWindow, func(e block.Extent) error {
				if e.Type.ReadsZero() && opts.TargetZeroed {
					c.skipped.Add(e.Len)
					c.done.Add(e.Len)
					return nil
				}
				step := e.Len
				if e.Type == block.Data {
					step = opts.ChunkSize
				}
				for off := e.Off; off < e.End(); {
					// Cut data at chunk-aligned boundaries so granules align.
					n := min(step, e.End()-off)
					if e.Type == block.Data {
						n = min(n, opts.ChunkSize-off%opts.ChunkSize)
					}
					select {
					case jobs <- job{off, n, e.Type}:
					case <-gctx.Done():
						return gctx.Err()
					}
					off += n
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	})

	for range opts.Workers {
		g.Go(func() error {
			buf := make([]byte, opts.ChunkSize)
			for j := range jobs {
				if err := run(src, dst, j, buf, opts, &c); err != nil {
					return err
				}
			}
			return nil
		})
	}

	stopProgress := startProgress(opts, total, &c)
	err := g.Wait()
	stopProgress()
	st := Stats{
		Total: total, Read: c.read.Load(), Written: c.written.Load(), Zeroed: c.zeroed.Load(),
		Skipped: c.skipped.Load(), Detected: c.detected.Load(), Elapsed: time.Since(start),
	}
	if err == nil {
		err = ctx.Err()
	}
	return st, err
}

func run(src block.Device, dst block.Writer, j job, buf []byte, opts Options, c *counters) error {
	if j.typ != block.Data {
		if err := dst.Zero(j.off, j.n); err != nil {
			return fmt.Errorf("zeroing target at offset %d (+%d): %w", j.off, j.n, err)
		}
		c.zeroed.Add(j.n)
		c.done.Add(j.n)
		return nil
	}
	p := buf[:j.n]
	if n, err := src.ReadAt(p, j.off); n < len(p) {
		if err == nil {
			err = errors.New("short read")
		}
		return fmt.Errorf("reading source at offset %d (+%d): %w", j.off, j.n, err)
	}
	c.read.Add(j.n)
	// Write maximal runs of non-zero granules; zero granules are skipped on a
	// fresh target and zeroed otherwise.
	g := opts.Granule
	flush := func(s, e int64, zero bool) error {
		if s == e {
			return nil
		}
		if zero {
			c.detected.Add(e - s)
			if opts.TargetZeroed {
				c.skipped.Add(e - s)
				return nil
			}
			if err := dst.Zero(j.off+s, e-s); err != nil {
				return fmt.Errorf("zeroing target at offset %d (+%d): %w", j.off+s, e-s, err)
			}
			c.zeroed.Add(e - s)
			return nil
		}
		if _, err := dst.WriteAt(p[s:e], j.off+s); err != nil {
			return fmt.Errorf("writing target at offset %d (+%d): %w", j.off+s, e-s, err)
		}
		c.written.Add(e - s)
		return nil
	}
	runStart, runZero := int64(0), false
	for s := int64(0); s < j.n; {
		e := min(j.n, (j.off+s)/g*g+g-j.off)
		z := block.IsZero(p[s:e])
		if s == 0 {
			runZero = z
		} else if z != runZero {
			if err := flush(runStart, s, runZero); err != nil {
				return err
			}
			runStart, runZero = s, z
		}
		s = e
	}
	if err := flush(runStart, j.n, runZero); err != nil {
		return err
	}
	c.done.Add(j.n)
	return nil
}

func withDefaults(o Options) Options {
	if o.Workers <= 0 {
		o.Workers = max(4, 2*runtime.GOMAXPROCS(0))
	}
	if o.ChunkSize <= 0 {
		o.ChunkSize = 2 << 20
	}
	if o.Granule <= 0 || o.Granule > o.ChunkSize || o.ChunkSize%o.Granule != 0 {
		o.Granule = min(4<<10, o.ChunkSize)
	}
	if o.ProgressEvery <= 0 {
		o.ProgressEvery = 200 * time.Millisecond
	}
	return o
}

func startProgress(opts Options, total int64, c *counters) func() {
	if opts.Progress == nil {
		return func() {}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	snap := func() Progress { return Progress{Done: c.done.Load(), Total: total, Read: c.read.Load()} }
	go func() {
		defer wg.Done()
		t := time.NewTicker(opts.ProgressEvery)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				opts.Progress(snap())
			case <-stop:
				opts.Progress(snap())
				return
			}
		}
	}()
	return func() { close(stop); wg.Wait() }
}
