package filters

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// flaky fails the first n reads with a transient error.
type flaky struct {
	block.Device
	fails atomic.Int32
	calls atomic.Int32
}

func (f *flaky) ReadAt(p []byte, off int64) (int, error) {
	f.calls.Add(1)
	if f.fails.Add(-1) >= 0 {
		return 0, errors.New("connection reset by peer")
	}
	return f.Device.ReadAt(p, off)
}

func TestRetrySucceedsAfterTransientFailures(t *testing.T) {
	m := block.NewMemory(1<<16, 4096)
	m.WriteAt(bytes.Repeat([]byte("x"), 4096), 4096)
	f := &flaky{Device: m}
	f.fails.Store(3)
	r := NewRetry(f, RetryOptions{Attempts: 5, Backoff: time.Millisecond})
	buf := make([]byte, 4096)
	if _, err := r.ReadAt(buf, 4096); err != nil {
		t.Fatalf("read after 3 transient failures: %v", err)
	}
	if !bytes.Equal(buf, bytes.Repeat([]byte("x"), 4096)) {
		t.Fatal("wrong bytes after retry")
	}
	if got := f.calls.Load(); got != 4 {
		t.Fatalf("%d calls, want 4", got)
	}
}

func TestRetryGivesUpAfterBound(t *testing.T) {
	f := &flaky{Device: block.NewMemory(1<<16, 4096)}
	f.fails.Store(100)
	r := NewRetry(f, RetryOptions{Attempts: 4, Backoff: time.Millisecond})
	_, err := r.ReadAt(make([]byte, 10), 0)
	if err == nil || !strings.Contains(err.Error(), "connection reset") || !strings.Contains(err.Error(), "4 attempts") {
		t.Fatalf("err = %v, want the last error after 4 attempts", err)
	}
	if got := f.calls.Load(); got != 4 {
		t.Fatalf("%d calls, want 4", got)
	}
}

func TestRetryStopsOnCancel(t *testing.T) {
	f := &flaky{Device: block.NewMemory(1<<16, 4096)}
	f.fails.Store(100)
	r := NewRetry(f, RetryOptions{Attempts: 100, Backoff: time.Hour})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	err := r.Do(ctx, "op", func() error { return errors.New("boom") })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
}
