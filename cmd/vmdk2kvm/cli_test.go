package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/internal/diskgen"
	"github.com/vmdk2kvm/vmdk2kvm/internal/testutil"
)

var (
	cliOnce sync.Once
	cliPath string
	cliErr  error
)

// buildCLI builds the vmdk2kvm binary once per test run (pure Go, as shipped)
// and returns its path. Any test in this package may use it.
func buildCLI(t testing.TB) string {
	t.Helper()
	cliOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vmdk2kvm-cli-")
		if err != nil {
			cliErr = err
			return
		}
		cliPath = filepath.Join(dir, "vmdk2kvm")
		cmd := exec.Command("go", "build", "-o", cliPath, ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			cliErr = err
			cliPath = string(out)
		}
	})
	if cliErr != nil {
		t.Fatalf("building vmdk2kvm: %v\n%s", cliErr, cliPath)
	}
	return cliPath
}

// runCLI runs the binary and returns stdout, stderr and the exit code.
func runCLI(t testing.TB, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command(buildCLI(t), args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

// TestInfoBadInputs: a missing file, a folder and a FIFO each give one clear
// line naming the path and a non-zero exit, never a stack trace.
func TestInfoBadInputs(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "pipe")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ path, want string }{
		{filepath.Join(dir, "missing.vmdk"), "no such file"},
		{dir, "is a directory"},
		{fifo, "not a regular file"},
	} {
		_, stderr, code := runCLI(t, "info", c.path)
		if code == 0 {
			t.Errorf("info %s: exit 0", c.path)
		}
		lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n")
		if len(lines) != 1 || !strings.HasPrefix(lines[0], "vmdk2kvm: ") || !strings.Contains(lines[0], c.path) || !strings.Contains(lines[0], c.want) {
			t.Errorf("info %s: stderr %q, want one line naming the path and %q", c.path, stderr, c.want)
		}
		if strings.Contains(stderr, "goroutine") || strings.Contains(stderr, "panic") {
			t.Errorf("info %s: stack trace in %q", c.path, stderr)
		}
	}
	if _, stderr, code := runCLI(t, "info"); code == 0 || !strings.Contains(stderr, "SRC") {
		t.Errorf("info without SRC: exit %d, %q", code, stderr)
	}
}

// TestInfoAndConvertRaw: info's allocation agrees with qemu-img map, and a
// convert is identical to its source (qemu-img compare).
func TestInfoAndConvertRaw(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "out.raw")
	if _, err := diskgen.Write(context.Background(), src, 48<<20, 9); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code := runCLI(t, "info", "--json", "--map", src)
	if code != 0 {
		t.Fatalf("info: %s", stderr)
	}
	var info struct {
		Format      string `json:"format"`
		VirtualSize int64  `json:"virtual_size"`
		Allocated   int64  `json:"allocated_bytes"`
		Map         []struct {
			Off  int64  `json:"offset"`
			Len  int64  `json:"length"`
			Type string `json:"type"`
		} `json:"map"`
	}
	if err := json.Unmarshal([]byte(stdout), &info); err != nil {
		t.Fatalf("info --json: %v\n%s", err, stdout)
	}
	var qemuData int64
	for _, e := range testutil.QemuMap(t, "raw", src) {
		if e.Data {
			qemuData += e.Length
		}
	}
	if info.Format != "raw" || info.VirtualSize != 48<<20 || info.Allocated != qemuData || len(info.Map) == 0 {
		t.Fatalf("info = %+v (qemu-img map: %d data bytes)", info, qemuData)
	}
	if _, stderr, code := runCLI(t, "convert", "-O", "raw", "--json", src, dst); code != 0 {
		t.Fatalf("convert: %s", stderr)
	}
	testutil.Compare(t, "raw", src, "raw", dst)
	fast := filepath.Join(dir, "fast.raw")
	if _, stderr, code := runCLI(t, "convert", "-O", "raw", "--no-sync", src, fast); code != 0 {
		t.Fatalf("convert --no-sync: %s", stderr)
	}
	testutil.Compare(t, "raw", src, "raw", fast)
	os.Remove(fast)
	// Converting onto an existing name replaces it only when complete; a
	// failing convert (unknown format) leaves no temporary file behind.
	if _, _, code := runCLI(t, "convert", "-O", "vhdx", src, filepath.Join(dir, "x.img")); code == 0 {
		t.Fatal("unknown output format accepted")
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 2 {
		t.Fatalf("folder holds %d entries, want the source and the output", len(ents))
	}
}
