package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/internal/diskgen"
)

// startServe runs `vmdk2kvm serve ARGS...` and returns the URI it prints
// and the process; the process is stopped at cleanup.
func startServe(t *testing.T, args ...string) (string, *exec.Cmd) {
	t.Helper()
	cmd := exec.Command(buildCLI(t), append([]string{"serve"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
		}
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- strings.TrimSpace(s)
		io.Copy(io.Discard, out)
		cmd.Wait()
		close(exited)
	}()
	select {
	case uri := <-line:
		if uri == "" {
			t.Fatalf("serve printed no URI: %s", stderr.String())
		}
		return uri, cmd
	case <-time.After(30 * time.Second):
		t.Fatalf("serve did not print its URI: %s", stderr.String())
	}
	return "", nil
}

func serveHashFile(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	io.Copy(h, f)
	return fmt.Sprintf("%x", h.Sum(nil))
}

func serveRunTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestServeCLI: `vmdk2kvm serve` exports a monolithicSparse VMDK on a unix
// socket; `vmdk2kvm convert` of its nbd+unix URI and qemu-img read the
// disk's bytes; SIGTERM stops it and removes the socket and pidfile.
func TestServeCLI(t *testing.T) {
	dir := t.TempDir()
	rawPath := filepath.Join(dir, "disk.raw")
	if _, err := diskgen.Write(context.Background(), rawPath, 24<<20, 3); err != nil {
		t.Fatal(err)
	}
	vmdkPath := filepath.Join(dir, "disk.vmdk")
	serveRunTool(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", rawPath, vmdkPath)
	sock, pidfile := filepath.Join(dir, "s.sock"), filepath.Join(dir, "serve.pid")
	uri, cmd := startServe(t, "--socket", sock, "--pidfile", pidfile, "--export", "disk", vmdkPath)
	if want := "nbd+unix:///disk?socket=" + strings.ReplaceAll(sock, "/", "%2F"); uri != want {
		t.Fatalf("serve printed %q, want %q", uri, want)
	}
	if b, _ := os.ReadFile(pidfile); strings.TrimSpace(string(b)) != strconv.Itoa(cmd.Process.Pid) {
		t.Fatalf("pidfile holds %q, want %d", b, cmd.Process.Pid)
	}
	out := filepath.Join(dir, "out.raw")
	if _, stderr, code := runCLI(t, "convert", "-O", "raw", uri, out); code != 0 {
		t.Fatalf("convert %s: %s", uri, stderr)
	}
	if serveHashFile(t, out) != serveHashFile(t, rawPath) {
		t.Fatal("convert from our NBD export differs from the disk")
	}
	if o := serveRunTool(t, "qemu-img", "compare", "-f", "raw", rawPath, uri); !strings.Contains(o, "identical") {
		t.Fatalf("qemu-img compare: %s", o)
	}
	stdout, stderr, code := runCLI(t, "info", "--json", uri)
	if code != 0 || !strings.Contains(stdout, `"format": "nbd"`) {
		t.Fatalf("info %s: %s %s", uri, stdout, stderr)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	serveWaitGone(t, pidfile, sock)
}

// TestServeWritableTCP: --writable over TCP on 127.0.0.1; qemu-io writes land
// in the overlay (read back through NBD), the source file is untouched.
func TestServeWritableTCP(t *testing.T) {
	dir := t.TempDir()
	rawPath := filepath.Join(dir, "disk.raw")
	if _, err := diskgen.Write(context.Background(), rawPath, 8<<20, 4); err != nil {
		t.Fatal(err)
	}
	before := serveHashFile(t, rawPath)
	uri, _ := startServe(t, "--writable", "--listen", "0", rawPath)
	if !strings.HasPrefix(uri, "nbd://127.0.0.1:") {
		t.Fatalf("serve --listen 0 printed %q", uri)
	}
	serveRunTool(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 1M", uri)
	if o := serveRunTool(t, "qemu-io", "-f", "raw", "-c", "read -P 0x5a 4096 1M", uri); strings.Contains(o, "verification failed") {
		t.Fatalf("write did not read back: %s", o)
	}
	if serveHashFile(t, rawPath) != before {
		t.Fatal("serve --writable wrote into the source")
	}
	if _, stderr, code := runCLI(t, "serve", "--tls=require", rawPath); code == 0 || !strings.Contains(stderr, "--tls-cert") {
		t.Fatalf("--tls=require without a certificate: exit %d: %s", code, stderr)
	}
}

// TestServeExitWithParent: a serve started by a shell that then exits stops
// by itself.
func TestServeExitWithParent(t *testing.T) {
	dir := t.TempDir()
	rawPath := filepath.Join(dir, "disk.raw")
	os.WriteFile(rawPath, make([]byte, 1<<20), 0o644)
	sock, pidfile := filepath.Join(dir, "s"), filepath.Join(dir, "pid")
	script := fmt.Sprintf("%q serve --socket %q --pidfile %q --exit-with-parent %q >/dev/null 2>&1 & sleep 2", buildCLI(t), sock, pidfile, rawPath)
	sh := exec.Command("sh", "-c", script)
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	// While the shell lives, serve runs.
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := os.Stat(pidfile); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("serve did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := sh.Wait(); err != nil {
		t.Fatal(err)
	}
	serveWaitGone(t, pidfile, sock)
}

func serveWaitGone(t *testing.T, paths ...string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for _, p := range paths {
		for {
			if _, err := os.Stat(p); os.IsNotExist(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still exists: serve did not stop", p)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}
