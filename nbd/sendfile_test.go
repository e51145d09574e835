package nbd_test

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
)

// hidden is a device without its optional methods: the server must read it
// into buffers.
type hidden struct{ block.Device }

// TestServerSendfile: a raw file export is sent from the page cache with
// sendfile; nbdcopy reads the same bytes from it as from the same device
// served through buffers. When the file is shortened under the export after
// its map was taken, the server closes the connection rather than send a
// reply shorter than its header says (which only the sendfile path does: the
// buffered path answers the failed read with an error and goes on).
func TestServerSendfile(t *testing.T) {
	need(t, "nbdcopy")
	dev := openFixture(t)
	if _, ok := dev.(block.FileMapper); !ok {
		t.Fatal("a raw file device does not map to its file")
	}
	sock, _ := serve(t, nbd.ServerOptions{},
		nbd.Export{Name: "file", Device: dev},
		nbd.Export{Name: "buf", Device: hidden{dev}})
	want := fileSHA(t, fixture())
	dir := t.TempDir()
	for _, name := range []string{"file", "buf"} {
		out := filepath.Join(dir, name+".raw")
		run(t, "nbdcopy", "--connections=4", unixURI(sock, name), out)
		if got := fileSHA(t, out); got != want {
			t.Errorf("export %s: nbdcopy's copy differs from the source", name)
		}
	}
	// Over TCP too (sendfile to a TCP socket).
	srv, err := nbd.NewServer(nbd.ServerOptions{}, nbd.Export{Name: "file", Device: dev})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(sctx, ln) }()
	out := filepath.Join(dir, "tcp.raw")
	run(t, "nbdcopy", "--connections=4", "nbd://"+ln.Addr().String()+"/file", out)
	stop()
	if err := <-done; err != nil {
		t.Fatalf("Serve over TCP: %v", err)
	}
	if got := fileSHA(t, out); got != want {
		t.Error("export over TCP: nbdcopy's copy differs from the source")
	}

	// A file of its own, shortened under the export.
	path := filepath.Join(dir, "short.raw")
	data := bytes.Repeat([]byte("sendfile"), 4<<20/8)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		name     string
		sendfile bool
	}{{"file", true}, {"buf", false}} {
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		f, err := file.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		var d block.Device = raw.NewDevice(f)
		if !tc.sendfile {
			d = hidden{d}
		}
		s, _ := serve(t, nbd.ServerOptions{}, nbd.Export{Device: d})
		c, err := nbd.Dial(ctx, unixURI(s, ""), nbd.ClientOptions{Connections: 1})
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 64<<10)
		if _, err := c.ReadAt(p, 3<<20); err != nil || !bytes.Equal(p, data[3<<20:3<<20+len(p)]) {
			t.Fatalf("%s: first read: %v", tc.name, err)
		}
		if err := os.Truncate(path, 2<<20); err != nil {
			t.Fatal(err)
		}
		if _, err := c.ReadAt(p, 3<<20); err == nil {
			t.Fatalf("%s: a read past the shortened file succeeded", tc.name)
		}
		_, err = c.ReadAt(p, 0)
		if tc.sendfile && err == nil {
			t.Fatalf("%s: the connection survived a reply it could not complete", tc.name)
		}
		if !tc.sendfile && (err != nil || !bytes.Equal(p, data[:len(p)])) {
			t.Fatalf("%s: read after an answered error: %v", tc.name, err)
		}
		c.Close()
		d.Close()
	}
}
