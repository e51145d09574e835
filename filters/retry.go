package filters

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// RetryOptions tune Retry.
type RetryOptions struct {
	// Attempts is the total number of tries of one request (default 5).
	Attempts int
	// Backoff is the first wait; each retry doubles it up to MaxBackoff
	// (defaults 100 ms and 5 s).
	Backoff, MaxBackoff time.Duration
	// Retryable says whether an error is worth another try (default: all
	// errors but io.EOF and context cancellation).
	Retryable func(error) bool
	// Log receives one line per retry (default slog.Default()).
	Log *slog.Logger
}

// Retry re-issues failed reads and extent queries of a device.
type Retry struct {
	block.Device
	opts RetryOptions
}

// NewRetry wraps d.
func NewRetry(d block.Device, opts RetryOptions) *Retry {
	if opts.Attempts <= 0 {
		opts.Attempts = 5
	}
	if opts.Backoff <= 0 {
		opts.Backoff = 100 * time.Millisecond
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 5 * time.Second
	}
	if opts.Retryable == nil {
		opts.Retryable = func(err error) bool {
			return !errors.Is(err, io.EOF) && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded)
		}
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	return &Retry{Device: d, opts: opts}
}

// Do runs op until it succeeds, fails with a non-retryable error, ctx ends,
// or the attempts are used up; it returns the last error, saying how many
// attempts were made.
func (r *Retry) Do(ctx context.Context, what string, op func() error) error {
	wait := r.opts.Backoff
	var err error
	for attempt := 1; ; attempt++ {
		if err = op(); err == nil || !r.opts.Retryable(err) {
			return err
		}
		if attempt >= r.opts.Attempts {
			return fmt.Errorf("%s: giving up after %d attempts: %w", what, attempt, err)
		}
		r.opts.Log.Warn("retrying", "op", what, "attempt", attempt, "wait", wait, "err", err)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%s: %w (last error: %v)", what, ctx.Err(), err)
		case <-t.C:
		}
		wait = min(2*wait, r.opts.MaxBackoff)
	}
}

// ReadAt implements block.Device. A short read at the end of the device
// (io.EOF with the bytes that exist) is an answer, not a failure.
func (r *Retry) ReadAt(p []byte, off int64) (int, error) {
	var n int
	var rerr error
	err := r.Do(context.Background(), fmt.Sprintf("read at offset %d (+%d)", off, len(p)), func() error {
		n, rerr = r.Device.ReadAt(p, off)
		if rerr == io.EOF || rerr == nil {
			return nil
		}
		return rerr
	})
	if err != nil {
		return n, err
	}
	return n, rerr
}

// Extents implements block.Device.
func (r *Retry) Extents(ctx context.Context, off, length int64) ([]block.Extent, error) {
	var out []block.Extent
	err := r.Do(ctx, fmt.Sprintf("extents at offset %d (+%d)", off, length), func() error {
		var err error
		out, err = r.Device.Extents(ctx, off, length)
		return err
	})
	return out, err
}
