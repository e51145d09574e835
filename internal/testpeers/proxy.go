package testpeers

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Fault is what the proxy does to one request.
type Fault int

const (
	// Pass forwards the request and its answer unchanged.
	Pass Fault = iota
	// Unavailable answers 503 without asking upstream.
	Unavailable
	// IgnoreRange drops the Range header, so upstream answers 200 with the
	// whole file, as a server without range support would.
	IgnoreRange
	// Slow waits Delay before answering.
	Slow
	// ResetMidBody sends the headers and half the body, then resets the TCP
	// connection.
	ResetMidBody
	// Truncate sends the headers and half the body, then closes the
	// connection cleanly (a body shorter than its Content-Length).
	Truncate
	// Unauthorized answers 401 without asking upstream (an expired session).
	Unauthorized
	numFaults
)

func (f Fault) String() string {
	return [...]string{"pass", "503", "ignore-range", "slow", "reset-mid-body", "truncate", "401"}[f]
}

// FaultProxy is an HTTP proxy in front of a real server that misbehaves on
// the requests a test picks.
type FaultProxy struct {
	URL      *url.URL // the proxy's base URL (http://127.0.0.1:PORT)
	Upstream *url.URL
	Delay    time.Duration // for Slow (default 2 s)

	mu     sync.Mutex
	decide func(n int, r *http.Request) Fault
	n      atomic.Int64
	counts [numFaults]atomic.Int64
	client *http.Client
}

// StartFaultProxy starts a proxy to upstream (scheme://host:port; an https
// upstream is not verified: it is the test's own server).
func StartFaultProxy(t testing.TB, upstream string) *FaultProxy {
	t.Helper()
	up, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	p := &FaultProxy{
		Upstream: &url.URL{Scheme: up.Scheme, Host: up.Host},
		Delay:    2 * time.Second,
		client: &http.Client{Transport: &http.Transport{
			TLSClientConfig:    &tls.Config{InsecureSkipVerify: true},
			DisableCompression: true,
		}},
	}
	srv := httptest.NewServer(http.HandlerFunc(p.serve))
	t.Cleanup(srv.Close)
	p.URL, _ = url.Parse(srv.URL)
	return p
}

// Set chooses the fault of each request: n counts requests from 1.
func (p *FaultProxy) Set(decide func(n int, r *http.Request) Fault) {
	p.mu.Lock()
	p.decide = decide
	p.mu.Unlock()
	p.n.Store(0)
}

// Count returns how many requests got fault f.
func (p *FaultProxy) Count(f Fault) int { return int(p.counts[f].Load()) }

// Rewrite points a URL of the upstream server at the proxy.
func (p *FaultProxy) Rewrite(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		return rawURL
	}
	u.Scheme, u.Host = p.URL.Scheme, p.URL.Host
	return u.String()
}

func (p *FaultProxy) serve(w http.ResponseWriter, r *http.Request) {
	n := int(p.n.Add(1))
	p.mu.Lock()
	decide := p.decide
	p.mu.Unlock()
	f := Pass
	if decide != nil {
		f = decide(n, r)
	}
	p.counts[f].Add(1)
	switch f {
	case Unavailable:
		http.Error(w, "injected 503", http.StatusServiceUnavailable)
		return
	case Unauthorized:
		http.Error(w, "injected 401", http.StatusUnauthorized)
		return
	case Slow:
		select {
		case <-time.After(p.Delay):
		case <-r.Context().Done():
			return
		}
	}
	out := r.Clone(r.Context())
	out.RequestURI = ""
	out.URL.Scheme, out.URL.Host = p.Upstream.Scheme, p.Upstream.Host
	out.Host = p.Upstream.Host
	if f == IgnoreRange {
		out.Header.Del("Range")
	}
	resp, err := p.client.Do(out)
	if err != nil {
		http.Error(w, "proxy: "+err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	if f != ResetMidBody && f != Truncate {
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
		return
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		http.Error(w, "proxy: "+err.Error(), http.StatusBadGateway)
		return
	}
	conn, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(fmt.Sprintf("proxy: hijack: %v", err)) // a test harness bug
	}
	defer conn.Close()
	writeHead(buf, resp, len(body))
	_, _ = buf.Write(body[:len(body)/2])
	_ = buf.Flush()
	if tc, ok := conn.(*net.TCPConn); ok && f == ResetMidBody {
		_ = tc.SetLinger(0) // close sends RST
	}
}

func writeHead(w *bufio.ReadWriter, resp *http.Response, length int) {
	fmt.Fprintf(w, "HTTP/1.1 %s\r\n", resp.Status)
	for k, vs := range resp.Header {
		if strings.EqualFold(k, "Content-Length") || strings.EqualFold(k, "Transfer-Encoding") {
			continue
		}
		for _, v := range vs {
			fmt.Fprintf(w, "%s: %s\r\n", k, v)
		}
	}
	fmt.Fprintf(w, "Content-Length: %d\r\nConnection: close\r\n\r\n", length)
}
