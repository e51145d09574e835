package testpeers

import (
	"context"
	"crypto/tls"
	"net/url"
	"testing"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/soap"
)

// VCSim is govmomi's vSphere simulator (a vCenter model) serving over TLS
// on 127.0.0.1, with a datastore whose backing is a local folder.
type VCSim struct {
	Server     *simulator.Server
	SDK        *url.URL // https://127.0.0.1:PORT/sdk, with the simulator's user (and password)
	Datacenter string
	Datastore  string
	Dir        string // the datastore's folder
	Thumbprint string // SHA-256 of the server certificate, colon-separated hex
	CAFile     string // the server certificate in PEM, to trust it
}

// StartVCSim starts the simulator and maps dir as a datastore named
// "testds" of datacenter DC0; it stops when the test ends.
func StartVCSim(t testing.TB, dir string) *VCSim {
	t.Helper()
	model := simulator.VPX()
	model.Cluster = 0 // one standalone host is enough
	model.Machine = 0
	if err := model.Create(); err != nil {
		t.Fatalf("simulator: %v", err)
	}
	model.Service.TLS = new(tls.Config)
	srv := model.Service.NewServer()
	t.Cleanup(func() { srv.Close(); model.Remove() })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := govmomi.NewClient(ctx, srv.URL, true)
	if err != nil {
		t.Fatalf("simulator login: %v", err)
	}
	defer c.Logout(ctx)
	finder := find.NewFinder(c.Client, true)
	dc, err := finder.DefaultDatacenter(ctx)
	if err != nil {
		t.Fatalf("simulator datacenter: %v", err)
	}
	finder.SetDatacenter(dc)
	host, err := finder.DefaultHostSystem(ctx)
	if err != nil {
		t.Fatalf("simulator host: %v", err)
	}
	dss, err := host.ConfigManager().DatastoreSystem(ctx)
	if err != nil {
		t.Fatalf("simulator datastore system: %v", err)
	}
	if _, err := dss.CreateLocalDatastore(ctx, "testds", dir); err != nil {
		t.Fatalf("simulator: map %s as a datastore: %v", dir, err)
	}
	caFile, err := srv.CertificateFile()
	if err != nil {
		t.Fatalf("simulator certificate: %v", err)
	}
	sdk := *srv.URL
	return &VCSim{
		Server: srv, SDK: &sdk, Datacenter: dc.Name(), Datastore: "testds", Dir: dir,
		Thumbprint: soap.ThumbprintSHA256(srv.Certificate()), CAFile: caFile,
	}
}

// FolderURL returns the /folder URL of a file of the datastore, relative to
// its folder (no credentials).
func (v *VCSim) FolderURL(rel string) string {
	u := url.URL{Scheme: v.SDK.Scheme, Host: v.SDK.Host, Path: "/folder/" + rel}
	q := url.Values{}
	q.Set("dcPath", v.Datacenter)
	q.Set("dsName", v.Datastore)
	u.RawQuery = q.Encode()
	return u.String()
}

// User returns the simulator's user name and password.
func (v *VCSim) User() (string, string) {
	p, _ := v.SDK.User.Password()
	return v.SDK.User.Username(), p
}
