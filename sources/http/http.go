// Package http is the HTTP(S) transport: a file on a web server read in place
// with Range requests, in particular a vSphere datastore file through the
// `/folder/PATH?dcPath=DC&dsName=DS` endpoint of vCenter or ESXi.
//
// Every file is an io.ReaderAt; nothing is downloaded whole. A ranged read
// answered with 200 at a non-zero offset (the server ignored Range) is an
// error, Content-Range is checked against what was asked, 416 names the
// offset. Reads run on several keep-alive connections (Config.Connections);
// 5xx answers, resets, truncated bodies and stalls are retried with
// exponential backoff a bounded number of times, each retry logged. Small
// reads (VMDK metadata, tar headers) go through a bounded block cache with
// readahead (filters.Cache) so they cost one request per aligned block.
//
// Sibling files (VMDK extents and parents) are opened relative to the first
// file: the last path element is swapped and the query (dcPath, dsName) kept.
//
// Authentication is a vSphere session cookie (a SOAP login through govmomi,
// the default when a user is named) or HTTP basic auth. TLS is verified by
// default; a SHA-256 or SHA-1 thumbprint of the leaf certificate pins a
// self-signed server; skipping verification happens only when asked.
package http

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	nethttp "net/http"
	"net/url"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/filters"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// Config tunes the transport. The zero value is usable: 4 connections,
// verified TLS, no authentication unless the URL names a user.
type Config struct {
	// Connections is the number of parallel connections per host (default 4).
	Connections int
	// Insecure skips TLS verification (a warning is logged).
	Insecure bool
	// Thumbprint pins the server's leaf certificate: hex SHA-256 or SHA-1,
	// colons and case ignored. A pinned certificate needs no CA.
	Thumbprint string
	// User authenticates; a user in the URL overrides it.
	User string
	// Password is called once, when a password is needed (file, env, prompt).
	Password func() (string, error)
	// Auth is "session" (vSphere SOAP login, then the session cookie; the
	// default), "basic", or "none".
	Auth string
	// Attempts bounds the tries of one request (default 6); Backoff is the
	// first wait, doubled each retry up to 8 s (default 200 ms).
	Attempts int
	Backoff  time.Duration
	// Timeout is how long a request may wait for headers or for the next body
	// bytes before it is abandoned and retried (default 60 s).
	Timeout time.Duration
	// MaxRequest splits larger reads into parallel requests (default 8 MiB).
	MaxRequest int64
	// Cache tunes the per-file block cache; CacheBytes < 0 disables it.
	Cache filters.CacheOptions
	// Log receives retries and warnings (default slog.Default()).
	Log *slog.Logger
}

// Stats counts what the transport did, for all files it opened.
type Stats struct {
	Requests     int64              `json:"requests"`
	Retries      int64              `json:"retries"`
	BytesFetched int64              `json:"bytes_fetched"`
	Cache        filters.CacheStats `json:"cache"`
}

// Transport opens http:// and https:// locations. Build it with New; it is
// safe for concurrent use and keeps one HTTP client (and one session) per
// host.
type Transport struct {
	cfg Config

	requests, retries, fetched atomic.Int64

	mu      sync.Mutex
	clients map[string]*client // by scheme://host:port

	caches caches
}

// caches sums the counters of the caches of a transport's files, open or
// closed.
type caches struct {
	mu     sync.Mutex
	open   map[*filters.Cache]bool
	closed filters.CacheStats
}

func (cs *caches) add(c *filters.Cache) {
	cs.mu.Lock()
	if cs.open == nil {
		cs.open = map[*filters.Cache]bool{}
	}
	cs.open[c] = true
	cs.mu.Unlock()
}

func (cs *caches) remove(c *filters.Cache) {
	cs.mu.Lock()
	delete(cs.open, c)
	cs.closed.Add(c.Stats())
	cs.mu.Unlock()
}

func (cs *caches) stats() filters.CacheStats {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	out := cs.closed
	for c := range cs.open {
		out.Add(c.Stats())
	}
	return out
}

// New returns a transport with cfg's defaults filled in.
func New(cfg Config) *Transport {
	if cfg.Connections <= 0 {
		cfg.Connections = 4
	}
	if cfg.Attempts <= 0 {
		cfg.Attempts = 6
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = 200 * time.Millisecond
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 60 * time.Second
	}
	if cfg.MaxRequest <= 0 {
		cfg.MaxRequest = 8 << 20
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Auth == "" {
		cfg.Auth = "session"
	}
	return &Transport{cfg: cfg, clients: map[string]*client{}}
}

// Schemes implements sources.Transport.
func (*Transport) Schemes() []string { return []string{"https", "http"} }

// Stats returns the counters so far.
func (t *Transport) Stats() Stats {
	return Stats{Requests: t.requests.Load(), Retries: t.retries.Load(), BytesFetched: t.fetched.Load(), Cache: t.caches.stats()}
}

// Locate implements sources.Transport.
func (t *Transport) Locate(ctx context.Context, location string) (sources.FS, string, error) {
	u, err := url.Parse(location)
	if err != nil {
		return nil, "", fmt.Errorf("not a valid URL: %w", urlErr(err)) // the URL may hold a password
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, "", fmt.Errorf("%s: not an http(s) URL", Redact(location))
	}
	if u.Host == "" {
		return nil, "", fmt.Errorf("%s: no host", Redact(location))
	}
	if _, ok := u.User.Password(); ok {
		return nil, "", fmt.Errorf("%s: a password in the URL would show in the process list; give it with --password-file or VMDK2KVM_PASSWORD", Redact(location))
	}
	user := t.cfg.User
	if u.User != nil && u.User.Username() != "" {
		user = u.User.Username()
	}
	u.User = nil
	u.Fragment = ""
	if u.Path == "" || strings.HasSuffix(u.Path, "/") {
		return nil, "", fmt.Errorf("%s: names a folder, not a file", Redact(location))
	}
	c, err := t.client(ctx, u, user)
	if err != nil {
		return nil, "", err
	}
	dir := *u
	dir.Path = path.Dir(u.Path)
	dir.RawPath = ""
	return &FS{t: t, c: c, dir: &dir}, path.Base(u.Path), nil
}

// urlErr drops the URL (which may hold a password) from a url.Parse error.
func urlErr(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// Redact removes a password from a URL for messages.
func Redact(location string) string {
	u, err := url.Parse(location)
	if err != nil || u.User == nil {
		return location
	}
	return u.Redacted()
}

// client returns the shared client of u's host, logging in when needed.
func (t *Transport) client(ctx context.Context, u *url.URL, user string) (*client, error) {
	key := u.Scheme + "://" + u.Host + "|" + user
	t.mu.Lock()
	defer t.mu.Unlock()
	if c, ok := t.clients[key]; ok {
		return c, nil
	}
	c, err := t.newClient(ctx, u, user)
	if err != nil {
		return nil, err
	}
	t.clients[key] = c
	return c, nil
}

// client is one host's connection pool and credentials.
type client struct {
	t    *Transport
	hc   *nethttp.Client
	host *url.URL // scheme://host, for login
	user string

	tls *tls.Config // for logging in again

	mu       sync.Mutex
	password *string // fetched once
	cookie   *nethttp.Cookie
	basic    bool
}

func (t *Transport) newClient(ctx context.Context, u *url.URL, user string) (*client, error) {
	tlsConf, err := t.tlsConfig(u)
	if err != nil {
		return nil, err
	}
	dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	tr := &nethttp.Transport{
		Proxy:                 nethttp.ProxyFromEnvironment,
		DialContext:           dialer.DialContext,
		TLSClientConfig:       tlsConf,
		TLSHandshakeTimeout:   30 * time.Second,
		MaxConnsPerHost:       t.cfg.Connections,
		MaxIdleConnsPerHost:   t.cfg.Connections,
		MaxIdleConns:          4 * t.cfg.Connections,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: t.cfg.Timeout,
		DisableCompression:    true, // ranges are of the stored bytes
		ReadBufferSize:        256 << 10,
		WriteBufferSize:       16 << 10,
	}
	host := &url.URL{Scheme: u.Scheme, Host: u.Host}
	c := &client{t: t, hc: &nethttp.Client{Transport: tr}, host: host, user: user, tls: tlsConf}
	if user == "" || t.cfg.Auth == "none" {
		return c, nil
	}
	switch t.cfg.Auth {
	case "basic":
		c.basic = true
	case "session":
		if err := c.login(ctx, tlsConf); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("http auth %q: want session, basic or none", t.cfg.Auth)
	}
	return c, nil
}

// tlsConfig verifies by default, pins a thumbprint, or skips when asked.
func (t *Transport) tlsConfig(u *url.URL) (*tls.Config, error) {
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if u.Scheme != "https" {
		return conf, nil
	}
	switch {
	case t.cfg.Thumbprint != "":
		want, err := ParseThumbprint(t.cfg.Thumbprint)
		if err != nil {
			return nil, err
		}
		conf.InsecureSkipVerify = true // replaced by the pin below
		conf.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("tls: server sent no certificate")
			}
			leaf := cs.PeerCertificates[0]
			if got := Thumbprint(leaf, len(want)); !strings.EqualFold(got, hex.EncodeToString(want)) {
				return &pinError{fmt.Sprintf("tls: %s certificate thumbprint is %s, not the pinned %s",
					u.Host, FormatThumbprint(leaf), t.cfg.Thumbprint)}
			}
			return nil
		}
	case t.cfg.Insecure:
		t.cfg.Log.Warn("TLS certificate verification disabled (--insecure): the server is not authenticated", "host", u.Host)
		conf.InsecureSkipVerify = true
	}
	return conf, nil
}

// ParseThumbprint decodes a SHA-256 or SHA-1 thumbprint given as hex, with
// or without colons, optionally prefixed "SHA256:" or "SHA1:".
func ParseThumbprint(s string) ([]byte, error) {
	h := strings.ToLower(strings.TrimSpace(s))
	for _, p := range []string{"sha256:", "sha1:", "sha-256:", "sha-1:"} {
		h = strings.TrimPrefix(h, p)
	}
	h = strings.NewReplacer(":", "", " ", "").Replace(h)
	b, err := hex.DecodeString(h)
	if err != nil || (len(b) != sha256.Size && len(b) != sha1.Size) {
		return nil, fmt.Errorf("thumbprint %q: want the hex SHA-256 (or SHA-1) of the server certificate, e.g. as `openssl x509 -noout -fingerprint -sha256` prints it", s)
	}
	return b, nil
}

// Thumbprint returns the lower-case hex SHA-256 (size 32) or SHA-1 (size 20)
// of a certificate.
func Thumbprint(cert *x509.Certificate, size int) string {
	if size == sha1.Size {
		s := sha1.Sum(cert.Raw)
		return hex.EncodeToString(s[:])
	}
	s := sha256.Sum256(cert.Raw)
	return hex.EncodeToString(s[:])
}

// FormatThumbprint is the SHA-256 thumbprint as colon-separated upper-case
// hex, the form vSphere and openssl print.
func FormatThumbprint(cert *x509.Certificate) string {
	s := sha256.Sum256(cert.Raw)
	parts := make([]string, len(s))
	for i, b := range s {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

func (c *client) getPassword() (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.password != nil {
		return *c.password, nil
	}
	if c.t.cfg.Password == nil {
		return "", fmt.Errorf("%s: user %q needs a password: give it with --password-file or VMDK2KVM_PASSWORD", c.host.Host, c.user)
	}
	p, err := c.t.cfg.Password()
	if err != nil {
		return "", err
	}
	c.password = &p
	return p, nil
}

// authorize adds credentials to a request.
func (c *client) authorize(req *nethttp.Request) error {
	if c.basic {
		p, err := c.getPassword()
		if err != nil {
			return err
		}
		req.SetBasicAuth(c.user, p)
		return nil
	}
	c.mu.Lock()
	cookie := c.cookie
	c.mu.Unlock()
	if cookie != nil {
		req.AddCookie(&nethttp.Cookie{Name: cookie.Name, Value: cookie.Value})
	}
	return nil
}

// FS is a folder on a web server.
type FS struct {
	t   *Transport
	c   *client
	dir *url.URL // path is the folder; query kept for every file
}

// URL returns the URL of a file of the folder: a relative name is joined to
// the folder's path, an absolute one replaces it; the query is kept.
func (fsys *FS) URL(name string) *url.URL {
	u := *fsys.dir
	if path.IsAbs(name) {
		u.Path = path.Clean(name)
	} else {
		u.Path = path.Join(fsys.dir.Path, name)
	}
	u.RawPath = ""
	return &u
}

// Describe implements sources.FS.
func (fsys *FS) Describe(name string) string { return fsys.URL(name).String() }

// Open implements sources.FS: the size comes from HEAD, or from the
// Content-Range of a one-byte ranged GET where HEAD is not answered.
func (fsys *FS) Open(ctx context.Context, name string) (sources.File, error) {
	f := &File{c: fsys.c, url: fsys.URL(name).String()}
	size, err := f.stat(ctx)
	if err != nil {
		return nil, err
	}
	f.size = size
	if fsys.t.cfg.Cache.MaxBytes < 0 {
		return f, nil
	}
	// The cache owns f: closing it closes f.
	c := filters.NewCache(f, size, fsys.t.cfg.Cache)
	fsys.t.caches.add(c)
	return &cachedFile{Cache: c, t: fsys.t, url: f.url}, nil
}

// cachedFile logs what reading the file cost when it is closed (--verbose).
type cachedFile struct {
	*filters.Cache
	t   *Transport
	url string
}

func (c *cachedFile) Close() error {
	c.t.caches.remove(c.Cache)
	cs, ts := c.Cache.Stats(), c.t.Stats()
	c.t.cfg.Log.Info("https file closed", "url", c.url, "cache_hits", cs.Hits, "cache_misses", cs.Misses,
		"readahead_blocks", cs.Readaheads, "large_reads", cs.Bypassed, "transport_requests", ts.Requests,
		"transport_retries", ts.Retries, "transport_bytes_fetched", ts.BytesFetched)
	return c.Cache.Close()
}

// pinError is a certificate that does not match the pinned thumbprint.
type pinError struct{ msg string }

func (e *pinError) Error() string { return e.msg }
