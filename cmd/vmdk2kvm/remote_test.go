package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/internal/testpeers"
)

// runRemoteCLI runs the app in-process and returns stdout and the error.
func runRemoteCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := newApp(&out, &errb).RunContext(context.Background(), append([]string{"vmdk2kvm"}, args...))
	return out.String(), err
}

// TestRemoteSources runs info and convert on a VMDK chain read in place
// over SSH (SFTP) and over HTTPS from the vSphere simulator's datastore;
// the converted disk equals qemu-img's conversion of the local files.
func TestRemoteSources(t *testing.T) {
	dir, oracle := t.TempDir(), t.TempDir()
	var chain testpeers.Chain
	for _, c := range testpeers.VMDKChains(t, dir, oracle) {
		if c.Name == "sparse-chain" {
			chain = c
		}
	}
	sshd := testpeers.StartSSHD(t, testpeers.SSHDOptions{})
	sim := testpeers.StartVCSim(t, dir)
	sshArgs := []string{"--known-hosts", sshd.KnownHosts, "--ssh-key", sshd.KeyFile}
	for _, tc := range []struct {
		name string
		url  string
		args []string
	}{
		{"ssh", fmt.Sprintf("ssh://%s@%s%s", sshd.User, sshd.Addr, filepath.Join(dir, chain.Top)), sshArgs},
		{"https", sim.FolderURL(chain.Top), []string{"--thumbprint", sim.Thumbprint, "--connections", "3"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := runRemoteCLI(t, append(append([]string{"info", "--json"}, tc.args...), tc.url)...)
			if err != nil {
				t.Fatal(err)
			}
			var info struct {
				Format      string `json:"format"`
				VirtualSize int64  `json:"virtual_size"`
				Layers      []any  `json:"layers"`
				Remote      map[string]struct {
					Requests int64 `json:"requests"`
					Cache    struct {
						Misses int64 `json:"misses"`
					} `json:"cache"`
				} `json:"remote"`
			}
			if err := json.Unmarshal([]byte(out), &info); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			if info.Format != "vmdk" || info.VirtualSize != 8<<20 || len(info.Layers) != 2 {
				t.Fatalf("info %+v", info)
			}
			// The transport's counters are in the JSON: requests (https) and
			// cache misses (both: the chain's metadata was read).
			if r := info.Remote[tc.name]; r.Cache.Misses == 0 || (tc.name == "https" && r.Requests == 0) {
				t.Fatalf("remote counters %+v", info.Remote)
			}
			dst := filepath.Join(t.TempDir(), "out.raw")
			out, err = runRemoteCLI(t, append(append([]string{"convert", "--json", "-O", "raw"}, tc.args...), tc.url, dst)...)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(out, `"event":"remote"`) {
				t.Fatalf("convert --json without remote counters: %s", out)
			}
			if b, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", dst, chain.Raw).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img compare: %v\n%s", err, b)
			}
			// serve exports the flattened remote chain over NBD; qemu-img reads it.
			sock := filepath.Join(t.TempDir(), "nbd.sock")
			uri, _ := startServe(t, append(append([]string{"--socket", sock}, tc.args...), tc.url)...)
			if b, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", chain.Raw, uri).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img compare with %s: %v\n%s", uri, err, b)
			}
		})
	}
	// An unknown host key is refused, saying how to trust it.
	empty := filepath.Join(t.TempDir(), "known_hosts")
	os.WriteFile(empty, nil, 0o600)
	_, err := runRemoteCLI(t, "info", "--known-hosts", empty, "--ssh-key", sshd.KeyFile,
		fmt.Sprintf("ssh://%s@%s%s", sshd.User, sshd.Addr, filepath.Join(dir, chain.Top)))
	if err == nil || !strings.Contains(err.Error(), "--ssh-host-key-fingerprint SHA256:") {
		t.Fatalf("unknown host key: %v", err)
	}
	// Without a thumbprint the simulator's self-signed certificate is refused.
	if _, err := runRemoteCLI(t, "info", sim.FolderURL(chain.Top)); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("unverified https: %v", err)
	}
}
