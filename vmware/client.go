// Package vmware is vmdk2kvm's vSphere control plane: it connects to vCenter
// or ESXi with govmomi, finds VMs, describes them (hardware, disks with their
// backing chains, CBT state, snapshot tree), creates and removes snapshots,
// enables Changed Block Tracking, and resolves where each disk's bytes can be
// read (HTTPS /folder URLs, an ESXi SSH path, or a VDDK request). It never
// reads disk contents: moving bytes is the data plane's job.
package vmware

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/session/keepalive"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// Config says where and how to connect. The password is held in memory only.
type Config struct {
	// URL of vCenter or ESXi: "vc.example.com", "https://vc:8443" or a full
	// SDK URL. Credentials in the URL are refused (they would sit in argv).
	URL      string
	User     string
	Password string
	// Thumbprint pins the server certificate (SHA-1 or SHA-256, hex with
	// or without colons), for self-signed certificates.
	Thumbprint string
	// Insecure skips certificate verification entirely.
	Insecure bool
	// KeepAlive is the idle interval of session keep-alive (default 5m;
	// negative disables it).
	KeepAlive time.Duration
}

// Client is a logged-in vSphere session. Expired sessions are logged in
// again transparently; Close logs out.
type Client struct {
	vim  *vim25.Client
	sm   *session.Manager
	url  *url.URL
	user string
	ka   *keepalive.HandlerSOAP

	mu   sync.Mutex
	cert *x509.Certificate // the verified server certificate
}

// Error kinds a caller (the CLI) may want to tell apart.
var (
	ErrLogin       = errors.New("login failed")
	ErrUnreachable = errors.New("host unreachable")
	ErrUntrusted   = errors.New("certificate not trusted")
	ErrNotFound    = errors.New("not found")
)

// UntrustedError is returned when the server's certificate does not verify
// and no (matching) thumbprint was given.
type UntrustedError struct {
	Host       string
	Thumbprint string // SHA-1, as vSphere shows it
	SHA256     string
	Mismatch   bool // a thumbprint was given, and it differs
}

func (e *UntrustedError) Error() string {
	if e.Mismatch {
		return fmt.Sprintf("certificate of %s does not match --thumbprint: its SHA-1 thumbprint is %s", e.Host, e.Thumbprint)
	}
	return fmt.Sprintf("certificate of %s is not trusted (self-signed?): its SHA-1 thumbprint is %s; after checking it, pin it with --thumbprint %s (or use --insecure)", e.Host, e.Thumbprint, e.Thumbprint)
}

func (e *UntrustedError) Unwrap() error { return ErrUntrusted }

// ParseServerURL turns a vCenter/ESXi address into its SDK URL.
func ParseServerURL(s string) (*url.URL, error) {
	if s == "" {
		return nil, errors.New("no vCenter given (--vcenter or VMDK2KVM_VCENTER)")
	}
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("vCenter URL %q: %w", s, err)
	}
	if u.Scheme != "https" && u.Scheme != "http" {
		return nil, fmt.Errorf("vCenter URL %q: scheme must be https", s)
	}
	if u.User != nil {
		if _, ok := u.User.Password(); ok {
			return nil, errors.New("vCenter URL must not carry a password: use --password-file, VMDK2KVM_PASSWORD or the prompt")
		}
	}
	if u.Host == "" {
		return nil, fmt.Errorf("vCenter URL %q has no host", s)
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = "/sdk"
	}
	u.User = nil
	u.RawQuery, u.Fragment = "", ""
	return u, nil
}

// NormalizeThumbprint returns a thumbprint in govmomi's form (upper-case hex
// pairs joined by colons).
func NormalizeThumbprint(s string) (string, error) {
	h := strings.ToUpper(strings.NewReplacer(":", "", " ", "", "-", "").Replace(s))
	if len(h) != 40 && len(h) != 64 {
		return "", fmt.Errorf("thumbprint %q: want a SHA-1 (40 hex digits) or SHA-256 (64 hex digits)", s)
	}
	var b strings.Builder
	for i := 0; i < len(h); i += 2 {
		c1, c2 := h[i], h[i+1]
		if !isHex(c1) || !isHex(c2) {
			return "", fmt.Errorf("thumbprint %q: not hexadecimal", s)
		}
		if i > 0 {
			b.WriteByte(':')
		}
		b.WriteByte(c1)
		b.WriteByte(c2)
	}
	return b.String(), nil
}

func isHex(c byte) bool { return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F') }

// Thumbprints returns the SHA-1 and SHA-256 thumbprints of a certificate.
func Thumbprints(der []byte) (sha1hex, sha256hex string) {
	s1 := sha1.Sum(der)
	s2 := sha256.Sum256(der)
	return colonHex(s1[:]), colonHex(s2[:])
}

func colonHex(b []byte) string {
	parts := make([]string, len(b))
	for i, c := range b {
		parts[i] = fmt.Sprintf("%02X", c)
	}
	return strings.Join(parts, ":")
}

// Connect logs in. Errors are one line, name the host, and never contain
// the password.
func Connect(ctx context.Context, cfg Config) (*Client, error) {
	u, err := ParseServerURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	if cfg.User == "" {
		return nil, fmt.Errorf("no user name for %s (--user, or user@ in the vsphere:// URI)", u.Host)
	}
	tp := ""
	if cfg.Thumbprint != "" {
		if tp, err = NormalizeThumbprint(cfg.Thumbprint); err != nil {
			return nil, err
		}
	}
	sc := soap.NewClient(u, cfg.Insecure)
	if tp != "" {
		sc.SetThumbprint(u.Host, tp)
	}
	c := &Client{url: u, user: cfg.User}
	if t, ok := sc.Client.Transport.(*http.Transport); ok && t.DialTLSContext != nil {
		dial := t.DialTLSContext
		t.DialTLSContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := dial(ctx, network, addr)
			if tc, ok := conn.(*tls.Conn); ok && err == nil {
				if certs := tc.ConnectionState().PeerCertificates; len(certs) > 0 {
					c.mu.Lock()
					c.cert = certs[0]
					c.mu.Unlock()
				}
			}
			return conn, err
		}
	}
	vc, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return nil, c.connectError(ctx, err, tp, cfg.Insecure)
	}
	c.vim = vc
	c.sm = session.NewManager(vc)
	creds := url.UserPassword(cfg.User, cfg.Password)
	if err := c.sm.Login(ctx, creds); err != nil {
		return nil, c.loginError(err)
	}
	// Re-login once when the server says the session is gone.
	vc.RoundTripper = &reloginRT{rt: vc.RoundTripper, login: func(ctx context.Context) error {
		return c.sm.Login(ctx, creds)
	}}
	idle := cfg.KeepAlive
	if idle == 0 {
		idle = 5 * time.Minute
	}
	if idle > 0 {
		c.ka = keepalive.NewHandlerSOAP(vc.RoundTripper, idle, nil)
		vc.RoundTripper = c.ka
		c.ka.Start() // it starts by itself only on a Login made through it
	}
	return c, nil
}

func (c *Client) connectError(ctx context.Context, err error, tp string, insecure bool) error {
	host := c.url.Host
	if !insecure && soap.IsCertificateUntrusted(err) || strings.Contains(err.Error(), "thumbprint does not match") {
		ue := &UntrustedError{Host: host, Mismatch: tp != ""}
		if cert, perr := peekCertificate(ctx, hostPort(c.url)); perr == nil {
			ue.Thumbprint, ue.SHA256 = Thumbprints(cert.Raw)
		} else {
			ue.Thumbprint = "unknown (" + perr.Error() + ")"
		}
		return ue
	}
	var ne net.Error
	var oe *net.OpError
	var dnsErr *net.DNSError
	switch {
	case errors.As(err, &dnsErr):
		return fmt.Errorf("%w: cannot resolve %s: %s", ErrUnreachable, host, dnsErr.Err)
	case errors.As(err, &oe):
		return fmt.Errorf("%w: cannot reach %s: %s", ErrUnreachable, host, rootCause(oe))
	case errors.As(err, &ne) && ne.Timeout():
		return fmt.Errorf("%w: cannot reach %s: timed out", ErrUnreachable, host)
	}
	return fmt.Errorf("connect to %s: %w", host, err)
}

func rootCause(err error) string {
	for {
		u := errors.Unwrap(err)
		if u == nil {
			return err.Error()
		}
		err = u
	}
}

func (c *Client) loginError(err error) error {
	if isFault[*types.InvalidLogin](err) {
		return fmt.Errorf("%w: %s rejected user %q: wrong user name or password", ErrLogin, c.url.Host, c.user)
	}
	return fmt.Errorf("login to %s as %q: %w", c.url.Host, c.user, err)
}

func hostPort(u *url.URL) string {
	if u.Port() != "" {
		return u.Host
	}
	return net.JoinHostPort(u.Hostname(), "443")
}

// peekCertificate reads the server's certificate without trusting it, only
// to show its thumbprint in an error.
func peekCertificate(ctx context.Context, addr string) (*x509.Certificate, error) {
	d := tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true}} // #nosec: only to print a thumbprint
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return nil, errors.New("no certificate")
	}
	return certs[0], nil
}

// Vim is the underlying govmomi client.
func (c *Client) Vim() *vim25.Client { return c.vim }

// URL is the SDK URL (without credentials).
func (c *Client) URL() *url.URL { u := *c.url; return &u }

// Host is the server's host[:port].
func (c *Client) Host() string { return c.url.Host }

// IsVC reports whether the server is vCenter (not a lone ESXi).
func (c *Client) IsVC() bool { return c.vim.IsVC() }

// ServerThumbprint is the SHA-1 thumbprint of the certificate the session
// was verified with ("" over plain HTTP).
func (c *Client) ServerThumbprint() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cert == nil {
		return ""
	}
	s1, _ := Thumbprints(c.cert.Raw)
	return s1
}

// Close logs out and stops the keep-alive.
func (c *Client) Close(ctx context.Context) error {
	if c.ka != nil {
		c.ka.Stop()
	}
	return c.sm.Logout(ctx)
}

// reloginRT logs in again once when a call fails with NotAuthenticated (the
// session expired or was terminated) and retries it.
type reloginRT struct {
	rt    soap.RoundTripper
	login func(context.Context) error
}

func (r *reloginRT) RoundTrip(ctx context.Context, req, res soap.HasFault) error {
	err := r.rt.RoundTrip(ctx, req, res)
	if !isFault[*types.NotAuthenticated](err) {
		return err
	}
	if lerr := r.login(ctx); lerr != nil {
		return fmt.Errorf("session expired and logging in again failed: %w", lerr)
	}
	// The failed answer was decoded into res: start from a zero value.
	v := reflect.ValueOf(res).Elem()
	v.Set(reflect.Zero(v.Type()))
	return r.rt.RoundTrip(ctx, req, res)
}

// isFault reports whether err is a SOAP or vim fault of type T (a pointer
// type such as *types.InvalidLogin); faults decode as values or pointers.
func isFault[T types.BaseMethodFault](err error) bool {
	if err == nil {
		return false
	}
	var f any
	switch {
	case soap.IsSoapFault(err):
		f = soap.ToSoapFault(err).VimFault()
	case soap.IsVimFault(err):
		f = soap.ToVimFault(err)
	default:
		return false
	}
	want := reflect.TypeFor[T]()
	got := reflect.TypeOf(f)
	return got == want || (want.Kind() == reflect.Pointer && got == want.Elem())
}
