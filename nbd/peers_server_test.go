package nbd_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/filters"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
)

// TestServerNbdinfo: libnbd's nbdinfo reads our server: size, read-only,
// the export list with descriptions, the base:allocation context, and a
// --map equal to the device's own extents.
func TestServerNbdinfo(t *testing.T) {
	need(t, "nbdinfo")
	dev := openFixture(t)
	small := block.NewMemory(1<<20, 4096)
	sock, _ := serve(t, nbd.ServerOptions{},
		nbd.Export{Name: "disk", Description: "the fixture", Device: dev},
		nbd.Export{Name: "small", Device: small, Writable: true})
	uri := unixURI(sock, "disk")

	var info struct {
		Exports []struct {
			Name        string   `json:"export-name"`
			Description string   `json:"description"`
			Size        int64    `json:"export-size"`
			ReadOnly    bool     `json:"is_read_only"`
			MultiConn   bool     `json:"can_multi_conn"`
			Zero        bool     `json:"can_zero"`
			Contexts    []string `json:"contexts"`
			BlockMax    int64    `json:"block_size_maximum"`
		} `json:"exports"`
		Structured bool `json:"structured"`
	}
	out := run(t, "nbdinfo", "--json", uri)
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo saw %d exports:\n%s", len(info.Exports), out)
	}
	e := info.Exports[0]
	if e.Name != "disk" || e.Size != fixtureSize || !e.ReadOnly || !e.MultiConn || e.Zero || e.Description != "the fixture" {
		t.Fatalf("nbdinfo says %+v", e)
	}
	if !info.Structured || len(e.Contexts) != 1 || e.Contexts[0] != nbd.ContextBaseAllocation {
		t.Fatalf("structured %v contexts %v", info.Structured, e.Contexts)
	}
	if e.BlockMax != nbd.MaxRequest {
		t.Fatalf("block maximum %d:\n%s", e.BlockMax, out)
	}

	// --list shows both exports, the writable one writable.
	out = run(t, "nbdinfo", "--list", "--json", unixURI(sock, ""))
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(info.Exports) != 2 || info.Exports[0].Name != "disk" || info.Exports[1].Name != "small" ||
		info.Exports[1].ReadOnly || !info.Exports[1].Zero || info.Exports[1].Size != 1<<20 {
		t.Fatalf("nbdinfo --list:\n%s", out)
	}

	// --map equals our extents.
	want := statusOf(allExtents(t, dev))
	if len(want) < 10 {
		t.Fatalf("fixture has only %d extents; the comparison would prove little", len(want))
	}
	sameStatus(t, "nbdinfo --map", nbdinfoMap(t, uri, ""), want)
	// And `nbdinfo --map` on a device with Zero extents too.
	small.WriteAt(bytes.Repeat([]byte{1}, 8192), 4096)
	small.Zero(65536, 65536)
	sameStatus(t, "nbdinfo --map (zeros)", nbdinfoMap(t, unixURI(sock, "small"), ""), statusOf(allExtents(t, small)))
}

// TestServerCopies: nbdcopy (one and four connections) and qemu-img convert
// read our export into files byte-identical to the source; qemu-img compare
// agrees.
func TestServerCopies(t *testing.T) {
	need(t, "nbdcopy", "qemu-img")
	dev := openFixture(t)
	sock, _ := serve(t, nbd.ServerOptions{}, nbd.Export{Device: dev})
	uri := unixURI(sock, "")
	want := fileSHA(t, fixture())
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"nbdcopy", []string{"nbdcopy", uri, filepath.Join(dir, "nbdcopy.raw")}},
		{"nbdcopy4", []string{"nbdcopy", "--connections=4", "--requests=16", uri, filepath.Join(dir, "nbdcopy4.raw")}},
		{"qemu-img", []string{"qemu-img", "convert", "-f", "raw", "-O", "raw", uri, filepath.Join(dir, "qemu-img.raw")}},
	} {
		run(t, tc.args[0], tc.args[1:]...)
		if got := fileSHA(t, tc.args[len(tc.args)-1]); got != want {
			t.Errorf("%s: copy differs from the source", tc.name)
		}
	}
	out := run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", fixture(), uri)
	if !strings.Contains(string(out), "identical") {
		t.Fatalf("qemu-img compare: %s", out)
	}
	// A compare that must fail, so the one above means something.
	other := filepath.Join(dir, "other.raw")
	data, _ := os.ReadFile(fixture())
	data[12345] ^= 0xff
	os.WriteFile(other, data, 0o644)
	if out, err := runErr("qemu-img", "compare", "-f", "raw", "-F", "raw", other, uri); err == nil {
		t.Fatalf("qemu-img compare found a changed file identical: %s", out)
	}
}

// TestServerWritableOverlay: qemu-io writes to a writable export of a
// copy-on-write overlay; the writes are visible through NBD, the source
// file is untouched.
func TestServerWritableOverlay(t *testing.T) {
	need(t, "qemu-io", "qemu-img")
	before := fileSHA(t, fixture())
	dev := openFixture(t)
	cow, err := filters.NewCOW(dev, filters.COWOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sock, _ := serve(t, nbd.ServerOptions{}, nbd.Export{Name: "rw", Device: cow, Writable: true})
	uri := unixURI(sock, "rw")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -z 5M 1M", "-c", "flush", uri)
	out := run(t, "qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 64k", "-c", "read -P 0 5M 1M", uri)
	if strings.Contains(string(out), "Pattern verification failed") {
		t.Fatalf("qemu-io read back:\n%s", out)
	}
	if fileSHA(t, fixture()) != before {
		t.Fatal("the source file changed")
	}
	// The export now equals the source with the two changes applied.
	data, _ := os.ReadFile(fixture())
	copy(data[1<<20:], bytes.Repeat([]byte{0xab}, 64<<10))
	clear(data[5<<20 : 6<<20])
	expect := filepath.Join(t.TempDir(), "expect.raw")
	os.WriteFile(expect, data, 0o644)
	out = run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", expect, uri)
	if !strings.Contains(string(out), "identical") {
		t.Fatalf("qemu-img compare: %s", out)
	}
}
