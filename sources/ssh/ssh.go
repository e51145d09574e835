// Package ssh is the SSH transport: files of a host reached over SSH (an
// ESXi host's /vmfs/volumes, any Linux box) read in place, at random
// offsets, with many reads in flight.
//
// Locations are ssh://[user@]host[:port]/absolute/path. Files are read over
// SFTP (pkg/sftp, concurrent requests). Where the server has no sftp
// subsystem, as on some ESXi builds, reads fall back to exec channels
// running `dd` with skip/count and sizes come from `stat -c %s`; the fallback
// is chosen automatically.
//
// The host key is checked against known_hosts (or a pinned SHA256
// fingerprint); an unknown key is refused with a message that names its
// fingerprint and how to trust it. Authentication tries the ssh-agent, key
// files, then a password (from a file, an env var or a prompt: the caller
// supplies it, never argv), also answering keyboard-interactive prompts as
// ESXi asks.
//
// Siblings (VMDK extents, parents) are opened relative to the first file
// with path.Join, on the same connection. The connection is shared by every
// file of a host and closed when the last file is.
package ssh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/user"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/pkg/sftp"
	gossh "golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"

	"github.com/vmdk2kvm/vmdk2kvm/filters"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// Config tunes the transport. The zero value uses the agent, the default
// key files and ~/.ssh/known_hosts.
type Config struct {
	// User logs in when the URL names none (default: the current user).
	User string
	// KeyFiles are private keys to try (default: ~/.ssh/id_ed25519,
	// id_ecdsa, id_rsa, those that exist).
	KeyFiles []string
	// AgentSocket is the ssh-agent socket ("" : $SSH_AUTH_SOCK; "none"
	// disables the agent).
	AgentSocket string
	// Password is called once when the server asks for a password.
	Password func() (string, error)
	// KnownHosts files (default ~/.ssh/known_hosts).
	KnownHosts []string
	// HostKeyFingerprint pins the host key ("SHA256:..." as ssh-keygen -l
	// prints it) instead of known_hosts.
	HostKeyFingerprint string
	// Connections bounds the reads in flight per file over exec, and scales
	// the SFTP requests in flight (default 4).
	Connections int
	// Mode is "auto" (SFTP, else exec; the default), "sftp" or "exec".
	Mode string
	// Timeout bounds connecting and the handshake (default 30 s).
	Timeout time.Duration
	// Cache tunes the per-file block cache; MaxBytes < 0 disables it.
	Cache filters.CacheOptions
	// Log receives notices (fallback to exec) (default slog.Default()).
	Log *slog.Logger
}

// Transport opens ssh:// locations. Build it with New.
type Transport struct {
	cfg Config

	mu    sync.Mutex
	conns map[string]*conn

	cmu         sync.Mutex
	openCaches  map[*filters.Cache]bool
	closedStats filters.CacheStats
}

// Stats is what the transport read, summed over its files' caches.
type Stats struct {
	Cache filters.CacheStats `json:"cache"`
}

// Stats returns the counters so far.
func (t *Transport) Stats() Stats {
	t.cmu.Lock()
	defer t.cmu.Unlock()
	out := t.closedStats
	for c := range t.openCaches {
		out.Add(c.Stats())
	}
	return Stats{Cache: out}
}

// New returns a transport with cfg's defaults filled in.
func New(cfg Config) *Transport {
	if cfg.Connections <= 0 {
		cfg.Connections = 4
	}
	if cfg.Mode == "" {
		cfg.Mode = "auto"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	home, _ := os.UserHomeDir()
	if cfg.KnownHosts == nil && home != "" {
		cfg.KnownHosts = []string{filepath.Join(home, ".ssh", "known_hosts")}
	}
	if cfg.KeyFiles == nil && home != "" {
		for _, n := range []string{"id_ed25519", "id_ecdsa", "id_rsa"} {
			p := filepath.Join(home, ".ssh", n)
			if _, err := os.Stat(p); err == nil {
				cfg.KeyFiles = append(cfg.KeyFiles, p)
			}
		}
	}
	if cfg.AgentSocket == "" {
		cfg.AgentSocket = os.Getenv("SSH_AUTH_SOCK")
	}
	return &Transport{cfg: cfg, conns: map[string]*conn{}, openCaches: map[*filters.Cache]bool{}}
}

// Schemes implements sources.Transport.
func (*Transport) Schemes() []string { return []string{"ssh"} }

// target is where a location points.
type target struct {
	user, addr string // addr is host:port
}

func (tg target) key() string { return tg.user + "@" + tg.addr }

// Locate implements sources.Transport. It does not connect: the first Open
// does, so errors name the file.
func (t *Transport) Locate(_ context.Context, location string) (sources.FS, string, error) {
	u, err := url.Parse(location)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // without the URL, which may hold a password
		}
		return nil, "", fmt.Errorf("not a valid URL: %w", err)
	}
	if _, ok := u.User.Password(); ok {
		return nil, "", fmt.Errorf("%s: a password in the URL would show in the process list; give it with --password-file or VMDK2KVM_PASSWORD", u.Redacted())
	}
	if u.Scheme != "ssh" || u.Host == "" {
		return nil, "", fmt.Errorf("%s: want ssh://[user@]host[:port]/path", u.Redacted())
	}
	tg := target{user: t.cfg.User, addr: u.Host}
	if u.User != nil && u.User.Username() != "" {
		tg.user = u.User.Username()
	}
	if tg.user == "" {
		if cu, err := user.Current(); err == nil {
			tg.user = cu.Username
		}
	}
	if u.Port() == "" {
		tg.addr = net.JoinHostPort(u.Hostname(), "22")
	}
	p := u.Path
	if p == "" || strings.HasSuffix(p, "/") {
		return nil, "", fmt.Errorf("%s: names a folder, not a file", u.Redacted())
	}
	return &FS{t: t, tg: tg, dir: path.Dir(p)}, path.Base(p), nil
}

// FS is a folder on an SSH host.
type FS struct {
	t   *Transport
	tg  target
	dir string
}

// Path returns the remote path of a file of the folder.
func (fsys *FS) Path(name string) string {
	if path.IsAbs(name) {
		return path.Clean(name)
	}
	return path.Join(fsys.dir, name)
}

// Describe implements sources.FS.
func (fsys *FS) Describe(name string) string {
	host, port, _ := net.SplitHostPort(fsys.tg.addr)
	hp := host
	if port != "22" {
		hp = fsys.tg.addr
	}
	return "ssh://" + fsys.tg.user + "@" + hp + fsys.Path(name)
}

// Open implements sources.FS.
func (fsys *FS) Open(ctx context.Context, name string) (sources.File, error) {
	c, err := fsys.t.acquire(ctx, fsys.tg)
	if err != nil {
		return nil, err
	}
	p := fsys.Path(name)
	var f sources.File
	if c.sftp != nil {
		f, err = c.openSFTP(fsys.tg, p, fsys.Describe(name))
	} else {
		f, err = c.openExec(ctx, fsys.tg, p, fsys.Describe(name))
	}
	if err != nil {
		c.release()
		return nil, err
	}
	if fsys.t.cfg.Cache.MaxBytes < 0 {
		return f, nil
	}
	copts := fsys.t.cfg.Cache
	if c.sftp == nil && copts.BlockSize == 0 {
		copts.BlockSize = 4 << 20 // each exec read costs a process: read more at once
	}
	cache := filters.NewCache(f, f.Size(), copts)
	fsys.t.cmu.Lock()
	fsys.t.openCaches[cache] = true
	fsys.t.cmu.Unlock()
	return &cachedFile{Cache: cache, t: fsys.t, desc: fsys.Describe(name)}, nil
}

// cachedFile logs what reading the file cost when it is closed (--verbose).
type cachedFile struct {
	*filters.Cache
	t    *Transport
	desc string
}

func (c *cachedFile) Close() error {
	cs := c.Cache.Stats()
	c.t.cmu.Lock()
	if c.t.openCaches[c.Cache] {
		delete(c.t.openCaches, c.Cache)
		c.t.closedStats.Add(cs)
	}
	c.t.cmu.Unlock()
	c.t.cfg.Log.Info("ssh file closed", "file", c.desc, "cache_hits", cs.Hits, "cache_misses", cs.Misses,
		"readahead_blocks", cs.Readaheads, "large_reads", cs.Bypassed, "bytes_read", cs.BytesBelow)
	return c.Cache.Close()
}

// conn is one SSH connection, shared by the files of a host.
type conn struct {
	t      *Transport
	key    string
	client *gossh.Client
	sftp   *sftp.Client  // nil: exec mode
	sem    chan struct{} // bounds exec channels in flight (sshd's MaxSessions defaults to 10)
	dead   chan struct{} // closed when the connection ends
	refs   int           // guarded by t.mu
}

// Mode reports "sftp" or "exec" for the host of an FS, connecting if needed.
func (fsys *FS) Mode(ctx context.Context) (string, error) {
	c, err := fsys.t.acquire(ctx, fsys.tg)
	if err != nil {
		return "", err
	}
	defer c.release()
	if c.sftp != nil {
		return "sftp", nil
	}
	return "exec", nil
}

// acquire returns the connection to tg, dialing it when there is none.
func (t *Transport) acquire(ctx context.Context, tg target) (*conn, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if c, ok := t.conns[tg.key()]; ok {
		select {
		case <-c.dead: // lost: its files let go of it as they reconnect
		default:
			c.refs++
			return c, nil
		}
	}
	c, err := t.dial(ctx, tg)
	if err != nil {
		return nil, err
	}
	c.refs = 1
	t.conns[tg.key()] = c
	return c, nil
}

// idleClose is how long a connection without open files stays up: a VMDK
// closes its descriptor before opening the extents it names, and each new
// connection costs a key exchange.
const idleClose = 3 * time.Second

// release drops a reference; the connection closes when it has stayed
// without references for idleClose.
func (c *conn) release() {
	c.t.mu.Lock()
	defer c.t.mu.Unlock()
	c.refs--
	if c.refs > 0 {
		return
	}
	time.AfterFunc(idleClose, func() {
		c.t.mu.Lock()
		idle := c.refs == 0
		if idle && c.t.conns[c.key] == c {
			delete(c.t.conns, c.key)
		}
		c.t.mu.Unlock()
		if idle {
			c.close()
		}
	})
}

func (c *conn) close() {
	if c.sftp != nil {
		c.sftp.Close()
	}
	c.client.Close()
}

func (t *Transport) dial(ctx context.Context, tg target) (*conn, error) {
	client, err := t.connect(ctx, tg, nil)
	var other *otherKeyTypes
	if errors.As(err, &other) {
		// known_hosts knows this host by another key type: ask for that one.
		client, err = t.connect(ctx, tg, other.algorithms())
	}
	if err != nil {
		return nil, err
	}
	c := &conn{t: t, key: tg.key(), client: client, sem: make(chan struct{}, min(t.cfg.Connections, 8)), dead: make(chan struct{})}
	go func() { client.Wait(); close(c.dead) }()
	if t.cfg.Mode == "exec" {
		return c, nil
	}
	sc, err := sftp.NewClient(client,
		sftp.UseConcurrentReads(true),
		sftp.MaxConcurrentRequestsPerFile(16*t.cfg.Connections))
	switch {
	case err == nil:
		c.sftp = sc
	case t.cfg.Mode == "sftp":
		client.Close()
		return nil, fmt.Errorf("ssh://%s: sftp: %w", tg.key(), err)
	default:
		t.cfg.Log.Info("no sftp subsystem; reading through exec channels (dd)", "host", tg.addr, "err", err)
	}
	return c, nil
}

func (t *Transport) connect(ctx context.Context, tg target, algos []string) (*gossh.Client, error) {
	hostKey, err := t.hostKeyCallback()
	if err != nil {
		return nil, err
	}
	auth, closeAgent := t.authMethods()
	defer closeAgent()
	cfg := &gossh.ClientConfig{
		User:              tg.user,
		Auth:              auth,
		HostKeyCallback:   hostKey,
		HostKeyAlgorithms: algos,
		Timeout:           t.cfg.Timeout,
	}
	d := net.Dialer{Timeout: t.cfg.Timeout, KeepAlive: 30 * time.Second}
	nc, err := d.DialContext(ctx, "tcp", tg.addr)
	if err != nil {
		return nil, fmt.Errorf("ssh://%s: %w", tg.key(), err)
	}
	_ = nc.SetDeadline(time.Now().Add(t.cfg.Timeout))
	cc, chans, reqs, err := gossh.NewClientConn(nc, tg.addr, cfg)
	if err != nil {
		nc.Close()
		var other *otherKeyTypes
		if errors.As(err, &other) {
			return nil, other
		}
		return nil, fmt.Errorf("ssh://%s: %w", tg.key(), err)
	}
	_ = nc.SetDeadline(time.Time{})
	return gossh.NewClient(cc, chans, reqs), nil
}

// authMethods: agent and key files as public keys, then password and
// keyboard-interactive when a password source is set.
func (t *Transport) authMethods() ([]gossh.AuthMethod, func()) {
	var signers []gossh.Signer
	closer := func() {}
	if s := t.cfg.AgentSocket; s != "" && s != "none" {
		if ac, err := net.Dial("unix", s); err == nil {
			if ss, err := agent.NewClient(ac).Signers(); err == nil {
				signers = append(signers, ss...)
			}
			closer = func() { ac.Close() }
		} else {
			t.cfg.Log.Debug("ssh-agent unreachable", "socket", s, "err", err)
		}
	}
	for _, kf := range t.cfg.KeyFiles {
		b, err := os.ReadFile(kf)
		if err != nil {
			t.cfg.Log.Warn("ssh key unreadable", "file", kf, "err", err)
			continue
		}
		s, err := gossh.ParsePrivateKey(b)
		if err != nil {
			t.cfg.Log.Warn("ssh key unusable (a key with a passphrase must be loaded into ssh-agent)", "file", kf, "err", err)
			continue
		}
		signers = append(signers, s)
	}
	var methods []gossh.AuthMethod
	if len(signers) > 0 {
		methods = append(methods, gossh.PublicKeys(signers...))
	}
	if t.cfg.Password != nil {
		var once sync.Once
		var pw string
		var pwErr error
		get := func() (string, error) {
			once.Do(func() { pw, pwErr = t.cfg.Password() })
			return pw, pwErr
		}
		methods = append(methods,
			gossh.PasswordCallback(get),
			gossh.KeyboardInteractive(func(_, _ string, questions []string, echos []bool) ([]string, error) {
				answers := make([]string, len(questions))
				for i := range questions {
					if !echos[i] { // a hidden answer is the password
						p, err := get()
						if err != nil {
							return nil, err
						}
						answers[i] = p
					}
				}
				return answers, nil
			}))
	}
	return methods, closer
}
