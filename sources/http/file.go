package http

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/filters"
	"golang.org/x/sync/errgroup"
	"io"
	"io/fs"
	nethttp "net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// File is one remote file read with Range requests.
type File struct {
	c      *client
	url    string
	size   int64
	closed atomic.Bool
}

// URL returns the file's URL (it never holds credentials).
func (f *File) URL() string { return f.url }

// Size implements sources.File.
func (f *File) Size() int64 { return f.size }

// Close implements sources.File. Connections stay pooled in the transport.
func (f *File) Close() error { f.closed.Store(true); return nil }

// ReadAt implements io.ReaderAt. Reads larger than Config.MaxRequest are
// split and fetched on parallel connections.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	if f.closed.Load() {
		return 0, fmt.Errorf("%s: read after close", f.url)
	}
	if off < 0 {
		return 0, fmt.Errorf("%s: read at negative offset %d", f.url, off)
	}
	if off >= f.size {
		return 0, io.EOF
	}
	want := p
	if rest := f.size - off; int64(len(p)) > rest {
		want = p[:rest]
	}
	ctx := context.Background()
	max := f.c.t.cfg.MaxRequest
	if int64(len(want)) <= max {
		if err := f.fetch(ctx, want, off); err != nil {
			return 0, err
		}
	} else {
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(f.c.t.cfg.Connections)
		for pos := int64(0); pos < int64(len(want)); pos += max {
			piece := want[pos:min(pos+max, int64(len(want)))]
			at := off + pos
			g.Go(func() error { return f.fetch(gctx, piece, at) })
		}
		if err := g.Wait(); err != nil {
			return 0, err
		}
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

// permanent marks an error that retrying cannot fix.
type permanent struct{ error }

func (p permanent) Unwrap() error { return p.error }

// ErrRangeIgnored is wrapped when a server answers a ranged request at a
// non-zero offset with the whole file.
var ErrRangeIgnored = errors.New("server ignored the Range header")

var errStalled = errors.New("no data within the timeout")

var errUnauthorized = errors.New("not authorized")

// fetch fills buf from off, retrying transient failures with backoff. A
// retry resumes where the last attempt stopped; the attempts are counted
// from the last progress.
func (f *File) fetch(ctx context.Context, buf []byte, off int64) error {
	cfg := &f.c.t.cfg
	wait := cfg.Backoff
	failures := 0
	for done := 0; done < len(buf); {
		n, err := f.get(ctx, buf[done:], off+int64(done))
		done += n
		if err == nil {
			continue
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s: read at offset %d: %w", f.url, off+int64(done), ctx.Err())
		}
		var p permanent
		if errors.As(err, &p) && !(errors.Is(err, errUnauthorized) && f.c.relogin(ctx)) {
			return err
		}
		if n > 0 {
			failures, wait = 0, cfg.Backoff
		}
		failures++
		if failures >= cfg.Attempts {
			return fmt.Errorf("%s: read of %d bytes at offset %d: giving up after %d attempts: %w",
				f.url, len(buf)-done, off+int64(done), failures, err)
		}
		f.c.t.retries.Add(1)
		cfg.Log.Warn("http read failed, retrying", "url", f.url, "offset", off+int64(done),
			"attempt", failures, "wait", wait, "err", err)
		if err := sleep(ctx, wait); err != nil {
			return fmt.Errorf("%s: read at offset %d: %w (last error: %v)", f.url, off+int64(done), err, err)
		}
		wait = min(2*wait, 8*time.Second)
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// request starts one request whose context is cancelled when no headers or
// body bytes arrive within the timeout; touch() re-arms it.
type request struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	timer  *time.Timer
	d      time.Duration
}

func (f *File) newRequest(ctx context.Context) *request {
	r := &request{d: f.c.t.cfg.Timeout}
	r.ctx, r.cancel = context.WithCancelCause(ctx)
	r.timer = time.AfterFunc(r.d, func() { r.cancel(errStalled) })
	return r
}

func (r *request) touch() { r.timer.Reset(r.d) }

func (r *request) done() { r.timer.Stop(); r.cancel(nil) }

// send sends one authorized request for the file (with a Range header
// unless rng is empty) under r's context. Errors come back classified for
// the retry filter.
func (f *File) send(r *request, method, rng string) (*nethttp.Response, error) {
	req, err := nethttp.NewRequestWithContext(r.ctx, method, f.url, nil)
	if err != nil {
		return nil, permanent{err}
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	if err := f.c.authorize(req); err != nil {
		return nil, permanent{err}
	}
	f.c.t.requests.Add(1)
	resp, err := f.c.hc.Do(req)
	if err != nil {
		return nil, r.wrap(classify(err))
	}
	return resp, nil
}

// wrap explains an error of a request that stalled.
func (r *request) wrap(err error) error {
	if cause := context.Cause(r.ctx); errors.Is(cause, errStalled) {
		return fmt.Errorf("%w (%v): %v", errStalled, r.d, err)
	}
	return err
}

// get issues one ranged GET for buf at off and reads what it answers. It
// returns how many bytes of buf it filled (always a prefix) and an error
// when it filled fewer than asked.
func (f *File) get(ctx context.Context, buf []byte, off int64) (int, error) {
	last := off + int64(len(buf)) - 1
	r := f.newRequest(ctx)
	defer r.done()
	resp, err := f.send(r, nethttp.MethodGet, fmt.Sprintf("bytes=%d-%d", off, last))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var n int64
	switch resp.StatusCode {
	case nethttp.StatusPartialContent:
		start, end, total, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return 0, permanent{fmt.Errorf("%s: answer to bytes=%d-%d: %w", f.url, off, last, err)}
		}
		if start != off || end > last || end < start {
			return 0, permanent{fmt.Errorf("%s: asked for bytes %d-%d, server sent %d-%d", f.url, off, last, start, end)}
		}
		if total >= 0 && total != f.size {
			return 0, permanent{fmt.Errorf("%s: file size changed from %d to %d bytes while reading", f.url, f.size, total)}
		}
		n = end - start + 1
	case nethttp.StatusOK:
		if off != 0 {
			return 0, permanent{fmt.Errorf("%s: %w (200 to a request for bytes %d-%d); refusing to download the whole file",
				f.url, ErrRangeIgnored, off, last)}
		}
		if resp.ContentLength >= 0 && resp.ContentLength != f.size {
			return 0, permanent{fmt.Errorf("%s: file size changed from %d to %d bytes while reading", f.url, f.size, resp.ContentLength)}
		}
		n = int64(len(buf)) // the first bytes of the whole file; the rest is not read
	default:
		return 0, f.statusError(resp, off, last)
	}
	got := 0
	for int64(got) < n {
		k, err := resp.Body.Read(buf[got:n])
		got += k
		f.c.t.fetched.Add(int64(k))
		r.touch()
		if err != nil && int64(got) < n {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return got, fmt.Errorf("body ended after %d of %d bytes at offset %d: %w", got, n, off, r.wrap(err))
		}
	}
	return got, nil
}

// statusError turns an unexpected status into an error; 5xx and 429 are
// retried, the rest are not.
func (f *File) statusError(resp *nethttp.Response, off, last int64) error {
	code := resp.StatusCode
	msg := fmt.Sprintf("%s: HTTP %s", f.url, resp.Status)
	switch {
	case code == nethttp.StatusRequestedRangeNotSatisfiable:
		return permanent{fmt.Errorf("%s: range %d-%d not satisfiable (Content-Range %q): offset %d is past the end of the file",
			msg, off, last, resp.Header.Get("Content-Range"), off)}
	case code == nethttp.StatusNotFound:
		return permanent{fmt.Errorf("%s: %w", msg, fs.ErrNotExist)}
	case code == nethttp.StatusUnauthorized || code == nethttp.StatusForbidden:
		return permanent{fmt.Errorf("%s: %w (give --user and a password via --password-file or VMDK2KVM_PASSWORD)", msg, errUnauthorized)}
	case code >= 500 || code == nethttp.StatusTooManyRequests:
		return fmt.Errorf("%s", msg)
	}
	return permanent{errors.New(msg)}
}

// parseContentRange parses "bytes START-END/TOTAL" (TOTAL may be "*",
// returned as -1).
func parseContentRange(s string) (start, end, total int64, err error) {
	bad := fmt.Errorf("bad Content-Range %q", s)
	rest, ok := strings.CutPrefix(strings.TrimSpace(s), "bytes ")
	if !ok {
		return 0, 0, 0, bad
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, bad
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, 0, bad
	}
	if start, err = strconv.ParseInt(a, 10, 64); err != nil || start < 0 {
		return 0, 0, 0, bad
	}
	if end, err = strconv.ParseInt(b, 10, 64); err != nil || end < start {
		return 0, 0, 0, bad
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil || total <= end {
			return 0, 0, 0, bad
		}
	}
	return start, end, total, nil
}

// stat finds the file's size: HEAD, else a one-byte ranged GET, retried
// with the project's retry filter (a 401 logs in again once per attempt).
func (f *File) stat(ctx context.Context) (int64, error) {
	cfg := &f.c.t.cfg
	var size int64
	attempt := 0
	r := filters.NewRetry(nil, filters.RetryOptions{
		Attempts: cfg.Attempts, Backoff: cfg.Backoff, MaxBackoff: 8 * time.Second, Log: cfg.Log,
		Retryable: func(err error) bool {
			var p permanent
			return ctx.Err() == nil && (!errors.As(err, &p) || (errors.Is(err, errUnauthorized) && f.c.relogin(ctx)))
		},
	})
	err := r.Do(ctx, f.url+": size", func() error {
		if attempt++; attempt > 1 {
			f.c.t.retries.Add(1)
		}
		var err error
		size, err = f.statOnce(ctx)
		return err
	})
	return size, err
}

func (f *File) statOnce(ctx context.Context) (int64, error) {
	r := f.newRequest(ctx)
	defer r.done()
	resp, err := f.send(r, nethttp.MethodHead, "")
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	if resp.StatusCode == nethttp.StatusOK && resp.ContentLength >= 0 {
		return resp.ContentLength, nil
	}
	if resp.StatusCode != nethttp.StatusOK && resp.StatusCode != nethttp.StatusMethodNotAllowed &&
		resp.StatusCode != nethttp.StatusNotImplemented {
		return 0, f.statusError(resp, 0, 0)
	}
	// No usable HEAD: ask for the first byte and read the total size.
	resp, err = f.send(r, nethttp.MethodGet, "bytes=0-0")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case nethttp.StatusPartialContent:
		_, _, total, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || total < 0 {
			return 0, permanent{fmt.Errorf("%s: size unknown: Content-Range %q", f.url, resp.Header.Get("Content-Range"))}
		}
		return total, nil
	case nethttp.StatusOK:
		if resp.ContentLength < 0 {
			return 0, permanent{fmt.Errorf("%s: size unknown: the server sends neither Content-Length nor Content-Range", f.url)}
		}
		return resp.ContentLength, nil
	case nethttp.StatusRequestedRangeNotSatisfiable:
		if strings.TrimSpace(resp.Header.Get("Content-Range")) == "bytes */0" {
			return 0, nil // an empty file
		}
	}
	return 0, f.statusError(resp, 0, 0)
}

// classify marks TLS trust failures as permanent: retrying cannot fix them.
func classify(err error) error {
	var (
		cv *tls.CertificateVerificationError
		ua x509.UnknownAuthorityError
		he x509.HostnameError
		ci x509.CertificateInvalidError
		pe *pinError
	)
	if errors.As(err, &cv) || errors.As(err, &ua) || errors.As(err, &he) || errors.As(err, &ci) || errors.As(err, &pe) {
		return permanent{err}
	}
	return err
}
