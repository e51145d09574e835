package cbttest

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// CountingProxy is a TLS reverse proxy in front of the simulator that counts
// the response bytes of datastore reads (/folder/...): what a sync really
// transferred from the source, measured at the server side.
type CountingProxy struct {
	srv      *httptest.Server
	URL      *url.URL // same path as the simulator's SDK URL, proxy's host
	folder   atomic.Int64
	requests atomic.Int64
}

// NewCountingProxy starts a proxy to target (the simulator's SDK URL).
func NewCountingProxy(target *url.URL) (*CountingProxy, error) {
	p := &CountingProxy{}
	base := &url.URL{Scheme: target.Scheme, Host: target.Host}
	rp := httputil.NewSingleHostReverseProxy(base)
	rp.Transport = &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
	rp.ModifyResponse = func(r *http.Response) error {
		if strings.HasPrefix(r.Request.URL.Path, "/folder/") && r.Request.Method == http.MethodGet {
			p.requests.Add(1)
			r.Body = &countingBody{ReadCloser: r.Body, n: &p.folder}
		}
		return nil
	}
	p.srv = httptest.NewTLSServer(rp)
	u := *target
	u.Host = strings.TrimPrefix(p.srv.URL, "https://")
	p.URL = &u
	return p, nil
}

// Thumbprint is the SHA-256 thumbprint of the proxy's certificate
// (AA:BB:...), for --thumbprint.
func (p *CountingProxy) Thumbprint() string {
	sum := sha256.Sum256(p.srv.Certificate().Raw)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

// FolderBytes returns the bytes served from /folder since the last Reset.
func (p *CountingProxy) FolderBytes() int64 { return p.folder.Load() }

// FolderRequests returns the number of /folder GETs since the last Reset.
func (p *CountingProxy) FolderRequests() int64 { return p.requests.Load() }

// Reset zeroes the counters.
func (p *CountingProxy) Reset() { p.folder.Store(0); p.requests.Store(0) }

// Close stops the proxy.
func (p *CountingProxy) Close() { p.srv.Close() }

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}

func vmSnapshotTree(ctx context.Context, vm *object.VirtualMachine) ([]types.VirtualMachineSnapshotTree, error) {
	var o mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"snapshot"}, &o); err != nil {
		return nil, err
	}
	if o.Snapshot == nil {
		return nil, nil
	}
	return o.Snapshot.RootSnapshotList, nil
}
