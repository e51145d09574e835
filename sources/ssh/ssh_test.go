package ssh_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	gossh "golang.org/x/crypto/ssh"

	"github.com/vmdk2kvm/vmdk2kvm/filters"
	"github.com/vmdk2kvm/vmdk2kvm/internal/testpeers"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
	sshsrc "github.com/vmdk2kvm/vmdk2kvm/sources/ssh"
	"github.com/vmdk2kvm/vmdk2kvm/sources/vmdk"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func registry(tr sources.Transport) *sources.Registry {
	return sources.NewRegistry().AddTransport(tr).AddFormat(vmdk.Format{}).AddFormat(raw.Format{})
}

func url(s *testpeers.SSHD, p string) string {
	return fmt.Sprintf("ssh://%s@%s%s", s.User, s.Addr, p)
}

// TestChains reads VMDK chains over SFTP and over the exec fallback (an sshd
// without the sftp subsystem), and holds them against qemu-img.
func TestChains(t *testing.T) {
	dir, oracle := t.TempDir(), t.TempDir()
	chains := testpeers.VMDKChains(t, dir, oracle)
	for _, mode := range []string{"sftp", "exec"} {
		t.Run(mode, func(t *testing.T) {
			sshd := testpeers.StartSSHD(t, testpeers.SSHDOptions{NoSFTP: mode == "exec"})
			tr := sshsrc.New(sshsrc.Config{KeyFiles: []string{sshd.KeyFile}, KnownHosts: []string{sshd.KnownHosts},
				AgentSocket: "none", Log: quiet()})
			fsys, _, err := tr.Locate(context.Background(), url(sshd, filepath.Join(dir, "x")))
			if err != nil {
				t.Fatal(err)
			}
			if got, err := fsys.(*sshsrc.FS).Mode(context.Background()); err != nil || got != mode {
				t.Fatalf("mode %q (%v), want %q (detected automatically)", got, err, mode)
			}
			reg := registry(tr)
			for _, c := range chains {
				img, err := reg.Open(context.Background(), url(sshd, filepath.Join(dir, c.Top)), sources.Options{})
				if err != nil {
					t.Fatalf("%s: %v", c.Name, err)
				}
				if img.Info.Format != "vmdk" {
					t.Fatalf("%s: format %s: %+v", c.Name, img.Info.Format, img.Info)
				}
				testpeers.SameAsRaw(t, img, c.Raw)
				img.Close()
			}
			// A raw file read at odd offsets and sizes (dd alignment).
			data := make([]byte, 3<<20+777)
			rand.Read(data)
			p := filepath.Join(dir, "odd.raw")
			if err := os.WriteFile(p, data, 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := reg.Open(context.Background(), url(sshd, p), sources.Options{Format: "raw"})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			for _, r := range [][2]int64{{0, 1}, {1, 511}, {513, 70000}, {1<<20 - 3, 2<<20 + 5}, {int64(len(data)) - 10, 10}, {5, int64(len(data)) - 5}} {
				buf := make([]byte, r[1])
				if n, err := img.ReadAt(buf, r[0]); err != nil || n != len(buf) || !bytes.Equal(buf, data[r[0]:r[0]+r[1]]) {
					t.Fatalf("read %d at %d: n=%d err=%v equal=%v", r[1], r[0], n, err, bytes.Equal(buf, data[r[0]:r[0]+r[1]]))
				}
			}
			if n, err := img.ReadAt(make([]byte, 20), int64(len(data))-10); n != 10 || err != io.EOF {
				t.Fatalf("read past the end: %d, %v", n, err)
			}
			// A missing sibling names the file.
			_, err = reg.Open(context.Background(), url(sshd, filepath.Join(dir, "missing.vmdk")), sources.Options{})
			if err == nil || !strings.Contains(err.Error(), "missing.vmdk") {
				t.Fatalf("missing file: %v", err)
			}
		})
	}
}

func TestHostKeys(t *testing.T) {
	sshd := testpeers.StartSSHD(t, testpeers.SSHDOptions{})
	p := filepath.Join(sshd.Dir, "disk.raw")
	if err := os.WriteFile(p, bytes.Repeat([]byte("x"), 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	fp := gossh.FingerprintSHA256(sshd.HostKey)
	open := func(cfg sshsrc.Config) error {
		cfg.KeyFiles, cfg.AgentSocket, cfg.Log = []string{sshd.KeyFile}, "none", quiet()
		img, err := registry(sshsrc.New(cfg)).Open(context.Background(), url(sshd, p), sources.Options{})
		if err == nil {
			img.Close()
		}
		return err
	}
	empty := filepath.Join(t.TempDir(), "known_hosts")
	os.WriteFile(empty, nil, 0o600)

	// Unknown: refused, saying how to trust it.
	err := open(sshsrc.Config{KnownHosts: []string{empty}})
	if err == nil || !strings.Contains(err.Error(), "unknown") || !strings.Contains(err.Error(), "--ssh-host-key-fingerprint "+fp) {
		t.Fatalf("unknown host key: %v", err)
	}
	// No known_hosts at all: the same.
	if err := open(sshsrc.Config{KnownHosts: []string{filepath.Join(t.TempDir(), "none")}}); err == nil || !strings.Contains(err.Error(), fp) {
		t.Fatalf("no known_hosts: %v", err)
	}
	// Pinned fingerprint: accepted; a wrong one refused.
	if err := open(sshsrc.Config{HostKeyFingerprint: fp, KnownHosts: []string{empty}}); err != nil {
		t.Fatalf("pinned: %v", err)
	}
	if err := open(sshsrc.Config{HostKeyFingerprint: "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}); err == nil || !strings.Contains(err.Error(), "not the pinned") {
		t.Fatalf("wrong pin: %v", err)
	}
	// known_hosts: accepted; a changed key of the same type refused.
	if err := open(sshsrc.Config{KnownHosts: []string{sshd.KnownHosts}}); err != nil {
		t.Fatalf("known host: %v", err)
	}
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	other, _ := gossh.NewPublicKey(pub)
	changed := filepath.Join(t.TempDir(), "known_hosts")
	line := fmt.Sprintf("[127.0.0.1]:%d %s", sshd.Port, gossh.MarshalAuthorizedKey(other))
	os.WriteFile(changed, []byte(line), 0o600)
	if err := open(sshsrc.Config{KnownHosts: []string{changed}}); err == nil || !strings.Contains(err.Error(), "CHANGED") {
		t.Fatalf("changed host key: %v", err)
	}
	// A client key the server does not know is refused by the server.
	_, wrongKey, _ := ed25519.GenerateKey(rand.Reader)
	blk, _ := gossh.MarshalPrivateKey(wrongKey, "")
	wrong := filepath.Join(t.TempDir(), "id_wrong")
	os.WriteFile(wrong, pem.EncodeToMemory(blk), 0o600)
	tr := sshsrc.New(sshsrc.Config{KnownHosts: []string{sshd.KnownHosts}, KeyFiles: []string{wrong}, AgentSocket: "none", Log: quiet()})
	if _, err := registry(tr).Open(context.Background(), url(sshd, p), sources.Options{}); err == nil || !strings.Contains(err.Error(), "unable to authenticate") {
		t.Fatalf("unknown client key: %v", err)
	}
	// A password in the URL is refused.
	if _, _, err := sshsrc.New(sshsrc.Config{}).Locate(context.Background(), "ssh://root:pw@127.0.0.1/x.vmdk"); err == nil || strings.Contains(err.Error(), "pw@") {
		t.Fatalf("password in URL: %v", err)
	}
}

// TestReconnect cuts the TCP connection under open files (SFTP and exec):
// the next reads dial again, reopen the file and return the right bytes.
func TestReconnect(t *testing.T) {
	dir, oracle := t.TempDir(), t.TempDir()
	var chain testpeers.Chain
	for _, c := range testpeers.VMDKChains(t, dir, oracle) {
		if c.Name == "sparse-chain" {
			chain = c
		}
	}
	for _, mode := range []string{"sftp", "exec"} {
		t.Run(mode, func(t *testing.T) {
			sshd := testpeers.StartSSHD(t, testpeers.SSHDOptions{NoSFTP: mode == "exec"})
			px := testpeers.StartTCPProxy(t, sshd.Addr)
			var log bytes.Buffer
			// No cache: every read after the cut must reach the server.
			tr := sshsrc.New(sshsrc.Config{KeyFiles: []string{sshd.KeyFile}, HostKeyFingerprint: gossh.FingerprintSHA256(sshd.HostKey),
				AgentSocket: "none", Log: slog.New(slog.NewTextHandler(&log, nil)), Cache: filters.CacheOptions{MaxBytes: -1}})
			loc := fmt.Sprintf("ssh://%s@%s%s", sshd.User, px.Addr, filepath.Join(dir, chain.Top))
			img, err := registry(tr).Open(context.Background(), loc, sources.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			want, _ := os.ReadFile(chain.Raw)
			buf := make([]byte, 64<<10)
			if _, err := img.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, want[:len(buf)]) {
				t.Fatalf("first read: %v", err)
			}
			px.Cut()
			// Offsets the cache has not seen, in both layers of the chain.
			for _, off := range []int64{1<<20 + 4096, 5<<20 + 8192, 7 << 20} {
				if _, err := img.ReadAt(buf, off); err != nil || !bytes.Equal(buf, want[off:off+int64(len(buf))]) {
					t.Fatalf("read at %d after the cut: %v", off, err)
				}
			}
			if !strings.Contains(log.String(), "reconnecting") {
				t.Fatalf("no reconnect logged: %s", log.String())
			}
			if mode == "sftp" { // over exec without a cache this is a dd per grain run: slow
				testpeers.SameAsRaw(t, img, chain.Raw)
			}
		})
	}
}
