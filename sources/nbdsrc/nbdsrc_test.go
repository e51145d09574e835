package nbdsrc_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	"github.com/vmdk2kvm/vmdk2kvm/sources/nbdsrc"
)

// TestOpenThroughRegistry: a registry with the opener opens an nbd+unix URI
// served by our server; bytes and extents are the served device's.
func TestOpenThroughRegistry(t *testing.T) {
	mem := block.NewMemory(4<<20, 4096)
	mem.WriteAt(bytes.Repeat([]byte("nbd!"), 16<<10), 1<<20)
	mem.Zero(2<<20, 64<<10)
	srv, err := nbd.NewServer(nbd.ServerOptions{}, nbd.Export{Name: "e", Device: mem})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- srv.Serve(ctx, ln) }()
	defer func() { cancel(); <-done }()

	reg := sources.NewRegistry().AddDevices(nbdsrc.Opener{})
	img, err := reg.Open(ctx, "nbd+unix:///e?socket="+sock, sources.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Info.Format != "nbd" || img.Info.VirtualSize != 4<<20 || img.Info.Props["nbd.export"] != "e" || img.Info.Props["nbd.read_only"] != "true" {
		t.Fatalf("info %+v", img.Info)
	}
	got, want := make([]byte, 4<<20), make([]byte, 4<<20)
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	mem.ReadAt(want, 0)
	if !bytes.Equal(got, want) {
		t.Fatal("bytes differ")
	}
	ge, _ := img.Extents(ctx, 0, 4<<20)
	we, _ := mem.Extents(ctx, 0, 4<<20)
	if len(ge) != len(we) {
		t.Fatalf("extents %v, want %v", ge, we)
	}
	for i := range ge {
		if ge[i] != we[i] {
			t.Fatalf("extent %d: %v, want %v", i, ge[i], we[i])
		}
	}
	if _, err := reg.Open(ctx, "nbd+unix:///e?socket="+sock, sources.Options{Format: "vmdk"}); !errors.Is(err, sources.ErrUnsupported) {
		t.Fatalf("forced format: %v", err)
	}
	if _, err := reg.Open(ctx, "nbd+unix:///e", sources.Options{}); err == nil {
		t.Fatal("URI without a socket opened")
	}
}
