package nbd_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/internal/diskgen"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
)

// fixtureSize is small enough for a lean test run and big enough to hold
// every kind of run diskgen makes, many times.
const fixtureSize = 48 << 20

var fixtureDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "nbd-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fixtureDir = dir
	if _, err := diskgen.Write(context.Background(), filepath.Join(dir, "disk.raw"), fixtureSize, 7); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// fixture returns the path of the generated test disk (read-only use).
func fixture() string { return filepath.Join(fixtureDir, "disk.raw") }

// openFixture opens the test disk as a device with SEEK_HOLE extents.
func openFixture(t testing.TB) block.Device {
	t.Helper()
	f, err := file.Open(fixture())
	if err != nil {
		t.Fatal(err)
	}
	d := raw.NewDevice(f)
	t.Cleanup(func() { d.Close() })
	return d
}

// need fails the test when a real peer is missing: these tools are part of
// the project's setup (scripts/deps.sh), so their absence is a failure.
func need(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed (make deps installs it): %v", tool, err)
		}
	}
}

// serve starts a server on a unix socket in a temp dir and returns its URI
// (for the empty export name unless one is given).
func serve(t testing.TB, opts nbd.ServerOptions, exports ...nbd.Export) (sock string, srv *nbd.Server) {
	t.Helper()
	srv, err := nbd.NewServer(opts, exports...)
	if err != nil {
		t.Fatal(err)
	}
	sock = filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Errorf("server did not stop")
		}
	})
	return sock, srv
}

func unixURI(sock, export string) string {
	return "nbd+unix:///" + export + "?socket=" + sock
}

// run runs a command under a timeout and returns its stdout; it fails the
// test with stderr on error.
func run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	out, err := runErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return out
}

func runErr(name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%w: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	return stdout.Bytes(), nil
}

// daemon starts a long-running peer (nbdkit -f, qemu-nbd) that creates sock,
// waits for the socket and kills the process at cleanup.
func daemon(t testing.TB, sock string, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return
		}
		select {
		case <-exited:
			t.Fatalf("%s %s exited early: %s", name, strings.Join(args, " "), stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not create %s: %s", name, sock, stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func sha(t testing.TB, r io.Reader) string {
	t.Helper()
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

func fileSHA(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return sha(t, f)
}

// deviceSHA hashes a whole device through ReadAt in chunks of odd sizes.
func deviceSHA(t testing.TB, d block.Device) string {
	t.Helper()
	return sha(t, io.NewSectionReader(d, 0, d.Size()))
}

// mapEntry is one line of `nbdinfo --map --json`.
type mapEntry struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   uint32 `json:"type"`
}

// nbdinfoMap returns `nbdinfo --map[=ctx] --json` with adjacent entries of
// equal type merged.
func nbdinfoMap(t testing.TB, uri, context string) []nbd.Status {
	t.Helper()
	arg := "--map"
	if context != "" {
		arg = "--map=" + context
	}
	out := run(t, "nbdinfo", arg, "--json", uri)
	var m []mapEntry
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("nbdinfo --map output: %v\n%s", err, out)
	}
	var sts []nbd.Status
	for _, e := range m {
		if n := len(sts); n > 0 && sts[n-1].Flags == e.Type && sts[n-1].Off+sts[n-1].Len == e.Offset {
			sts[n-1].Len += e.Length
			continue
		}
		sts = append(sts, nbd.Status{Off: e.Offset, Len: e.Length, Flags: e.Type})
	}
	return sts
}

// statusOf maps extents to base:allocation descriptors, merged.
func statusOf(exts []block.Extent) []nbd.Status {
	var sts []nbd.Status
	for _, e := range exts {
		f := uint32(0)
		switch e.Type {
		case block.Hole:
			f = nbd.StateHole | nbd.StateZero
		case block.Zero:
			f = nbd.StateZero
		}
		if n := len(sts); n > 0 && sts[n-1].Flags == f {
			sts[n-1].Len += e.Len
			continue
		}
		sts = append(sts, nbd.Status{Off: e.Off, Len: e.Len, Flags: f})
	}
	return sts
}

func allExtents(t testing.TB, d block.Device) []block.Extent {
	t.Helper()
	var out []block.Extent
	err := block.Walk(context.Background(), d, 0, d.Size(), 0, func(e block.Extent) error {
		out = block.Append(out, e)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameStatus(t testing.TB, what string, got, want []nbd.Status) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d descriptors, want %d\ngot  %v\nwant %v", what, len(got), len(want), head(got), head(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: descriptor %d is %+v, want %+v", what, i, got[i], want[i])
		}
	}
}

func head(s []nbd.Status) []nbd.Status { return s[:min(len(s), 8)] }
