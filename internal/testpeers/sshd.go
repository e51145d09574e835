package testpeers

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// SSHDOptions tune StartSSHD.
type SSHDOptions struct {
	// NoSFTP leaves out the sftp subsystem (like some ESXi builds), so
	// clients must read files through exec channels.
	NoSFTP bool
	// Extra lines appended to sshd_config.
	Extra []string
}

// SSHD is a running OpenSSH server on 127.0.0.1.
type SSHD struct {
	Host       string // "127.0.0.1"
	Port       int
	Addr       string // host:port
	User       string // the current user, authorised with KeyFile
	KeyFile    string // the client's private key (OpenSSH format, no passphrase)
	Signer     ssh.Signer
	HostKey    ssh.PublicKey
	KnownHosts string // a known_hosts file holding HostKey for Addr
	Dir        string
}

// StartSSHD starts /usr/sbin/sshd in the foreground with generated host and
// client keys and stops it when the test ends.
func StartSSHD(t testing.TB, opts SSHDOptions) *SSHD {
	t.Helper()
	sshd, err := exec.LookPath("sshd")
	if err != nil {
		sshd = "/usr/sbin/sshd"
	}
	if _, err := os.Stat(sshd); err != nil {
		t.Fatalf("sshd not installed (openssh-server, see scripts/deps.sh): %v", err)
	}
	_ = os.MkdirAll("/run/sshd", 0o755) // privilege separation folder
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	s := &SSHD{Host: "127.0.0.1", User: u.Username, Dir: dir}

	_, hostPub := genKey(t, filepath.Join(dir, "host_ed25519"))
	s.HostKey = hostPub
	s.Signer, _ = genKey(t, filepath.Join(dir, "client_ed25519"))
	s.KeyFile = filepath.Join(dir, "client_ed25519")
	auth := filepath.Join(dir, "authorized_keys")
	if err := os.WriteFile(auth, ssh.MarshalAuthorizedKey(s.Signer.PublicKey()), 0o600); err != nil {
		t.Fatal(err)
	}

	var lastErr error
	for try := 0; try < 3; try++ {
		s.Port = FreePort(t)
		s.Addr = hostPort(s.Port)
		cfg := []string{
			"Port " + fmt.Sprint(s.Port),
			"ListenAddress 127.0.0.1",
			"HostKey " + filepath.Join(dir, "host_ed25519"),
			"AuthorizedKeysFile " + auth,
			"PidFile " + filepath.Join(dir, "sshd.pid"),
			"StrictModes no",
			"UsePAM no",
			"PermitRootLogin yes",
			"PasswordAuthentication no",
			"KbdInteractiveAuthentication no",
			"MaxSessions 32",
			"MaxStartups 64",
		}
		if !opts.NoSFTP {
			cfg = append(cfg, "Subsystem sftp internal-sftp")
		}
		cfg = append(cfg, opts.Extra...)
		conf := filepath.Join(dir, "sshd_config")
		if err := os.WriteFile(conf, []byte(strings.Join(cfg, "\n")+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		logf := filepath.Join(dir, "sshd.log")
		cmd := exec.Command(sshd, "-D", "-f", conf, "-E", logf)
		if err := cmd.Start(); err != nil {
			t.Fatalf("start sshd: %v", err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		if lastErr = waitPort(s.Addr, exited, 10*time.Second); lastErr == nil {
			t.Cleanup(func() {
				_ = cmd.Process.Kill()
				<-exited
			})
			line := knownHostsLine(s.Addr, hostPub)
			s.KnownHosts = filepath.Join(dir, "known_hosts")
			if err := os.WriteFile(s.KnownHosts, []byte(line+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			return s
		}
		_ = cmd.Process.Kill()
		<-exited
		log, _ := os.ReadFile(logf)
		lastErr = fmt.Errorf("%v; sshd log: %s", lastErr, log)
	}
	t.Fatalf("sshd did not start: %v", lastErr)
	return nil
}

// knownHostsLine is a known_hosts entry for addr ("[host]:port" unless 22).
func knownHostsLine(addr string, key ssh.PublicKey) string {
	host, port, _ := net.SplitHostPort(addr)
	name := host
	if port != "22" {
		name = "[" + host + "]:" + port
	}
	return name + " " + strings.TrimSpace(string(ssh.MarshalAuthorizedKey(key)))
}

// genKey writes a fresh ed25519 private key in OpenSSH format to path.
func genKey(t testing.TB, path string) (ssh.Signer, ssh.PublicKey) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	blk, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(blk), 0o600); err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path+".pub", ssh.MarshalAuthorizedKey(signer.PublicKey()), 0o644); err != nil {
		t.Fatal(err)
	}
	return signer, signer.PublicKey()
}

// waitPort waits until addr accepts connections, the process exits, or the
// timeout passes.
func waitPort(addr string, exited chan error, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			exited <- err // for the caller's wait
			return fmt.Errorf("exited early: %v", err)
		default:
		}
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s: not listening after %v", addr, timeout)
}
