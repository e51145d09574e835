package nbd

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
)

// Target says where an export is: what Dial connects to.
type Target struct {
	Network string // "tcp" or "unix"
	Address string // host:port or socket path
	Export  string
	TLS     bool
	// From the URI query: a folder with ca-cert.pem and optionally
	// client-cert.pem + client-key.pem (libnbd's and nbdkit's convention),
	// the name to verify the server certificate against, and whether to
	// verify it at all.
	TLSCertificates string
	TLSHostname     string
	TLSNoVerify     bool
}

// ParseURI parses an NBD URI (the NBD URI specification's forms):
//
//	nbd://host[:port][/export]          nbds://... with TLS
//	nbd+unix:///[export]?socket=PATH    nbds+unix:///...?socket=PATH
//
// Query parameters: socket, tls-certificates=DIR, tls-hostname=NAME,
// tls-verify-peer=false.
func ParseURI(s string) (Target, error) {
	u, err := url.Parse(s)
	if err != nil {
		return Target{}, fmt.Errorf("nbd URI: %w", err)
	}
	var t Target
	switch strings.ToLower(u.Scheme) {
	case "nbd":
		t.Network = "tcp"
	case "nbds":
		t.Network, t.TLS = "tcp", true
	case "nbd+unix":
		t.Network = "unix"
	case "nbds+unix":
		t.Network, t.TLS = "unix", true
	default:
		return Target{}, fmt.Errorf("nbd URI %q: scheme %q is not nbd, nbds, nbd+unix or nbds+unix", redact(u), u.Scheme)
	}
	if u.User != nil {
		return Target{}, fmt.Errorf("nbd URI %q: user information is not supported", redact(u))
	}
	t.Export = strings.TrimPrefix(u.Path, "/")
	q := u.Query()
	if t.Network == "unix" {
		if u.Host != "" {
			return Target{}, fmt.Errorf("nbd URI %q: a unix socket URI has no host", redact(u))
		}
		t.Address = q.Get("socket")
		if t.Address == "" {
			return Target{}, fmt.Errorf("nbd URI %q: missing ?socket=PATH", redact(u))
		}
	} else {
		host, port := u.Hostname(), u.Port()
		if host == "" {
			host = "localhost"
		}
		if port == "" {
			port = defaultPort
		}
		t.Address = net.JoinHostPort(host, port)
		t.TLSHostname = host
	}
	t.TLSCertificates = q.Get("tls-certificates")
	if h := q.Get("tls-hostname"); h != "" {
		t.TLSHostname = h
	}
	switch v := q.Get("tls-verify-peer"); v {
	case "", "true", "1", "yes", "on":
	case "false", "0", "no", "off":
		t.TLSNoVerify = true
	default:
		return Target{}, fmt.Errorf("nbd URI %q: tls-verify-peer=%q is not a boolean", redact(u), v)
	}
	return t, nil
}

// String renders the target as an NBD URI.
func (t Target) String() string {
	scheme := "nbd"
	if t.TLS {
		scheme = "nbds"
	}
	u := url.URL{Scheme: scheme, Path: "/" + t.Export}
	q := url.Values{}
	if t.Network == "unix" {
		u.Scheme += "+unix"
		q.Set("socket", t.Address)
	} else {
		u.Host = t.Address
	}
	if t.TLSCertificates != "" {
		q.Set("tls-certificates", t.TLSCertificates)
	}
	u.RawQuery = q.Encode()
	return u.String()
}

func redact(u *url.URL) string { return u.Redacted() }

// tlsConfig builds the client TLS configuration of a target.
func (t Target) tlsConfig() (*tls.Config, error) {
	cfg := &tls.Config{ServerName: t.TLSHostname, MinVersion: tls.VersionTLS12}
	if cfg.ServerName == "" {
		cfg.ServerName = "localhost"
	}
	if t.TLSNoVerify {
		cfg.InsecureSkipVerify = true
	}
	if t.TLSCertificates == "" {
		return cfg, nil
	}
	dir := t.TLSCertificates
	if ca, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem")); err == nil {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(ca) {
			return nil, fmt.Errorf("%s: no certificate found", filepath.Join(dir, "ca-cert.pem"))
		}
		cfg.RootCAs = pool
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	certFile, keyFile := filepath.Join(dir, "client-cert.pem"), filepath.Join(dir, "client-key.pem")
	if _, err := os.Stat(certFile); err == nil {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("client certificate in %s: %w", dir, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}
