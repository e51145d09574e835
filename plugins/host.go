package plugins

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/vmdk2kvm/vmdk2kvm/plugins/proto"
)

// EnvPluginPath lists extra plugin directories, separated by ':'.
const EnvPluginPath = "VMDK2KVM_PLUGIN_PATH"

// SearchPath returns the plugin directories in precedence order: the given
// ones (--plugin-dir), $VMDK2KVM_PLUGIN_PATH, the directory of the running
// binary, and ~/.local/lib/vmdk2kvm/plugins.
func SearchPath(dirs []string) []string {
	out := append([]string(nil), dirs...)
	if env := os.Getenv(EnvPluginPath); env != "" {
		out = append(out, filepath.SplitList(env)...)
	}
	if exe, err := os.Executable(); err == nil {
		out = append(out, filepath.Dir(exe))
	}
	if home, err := os.UserHomeDir(); err == nil {
		out = append(out, filepath.Join(home, ".local", "lib", "vmdk2kvm", "plugins"))
	}
	return out
}

// Found is a plugin executable found on the search path.
type Found struct {
	Name string // without the vmdk2kvm-fixer- prefix
	Path string
	// Shadowed lists later files with the same name that were ignored.
	Shadowed []string
}

// Discover lists the executables named vmdk2kvm-fixer-* in dirs. The first
// directory holding a name wins; the result is sorted by name. Missing
// directories are ignored.
func Discover(dirs []string) ([]Found, error) {
	byName := map[string]*Found{}
	seenDir := map[string]bool{}
	for _, d := range dirs {
		abs, err := filepath.Abs(d)
		if err != nil || seenDir[abs] {
			continue
		}
		seenDir[abs] = true
		ents, err := os.ReadDir(abs)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return nil, fmt.Errorf("plugin directory %s: %w", abs, err)
		}
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), BinaryPrefix) || strings.HasSuffix(e.Name(), ".sha256") {
				continue
			}
			p := filepath.Join(abs, e.Name())
			st, err := os.Stat(p)
			if err != nil || !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
				continue
			}
			name := strings.TrimPrefix(e.Name(), BinaryPrefix)
			if f, ok := byName[name]; ok {
				f.Shadowed = append(f.Shadowed, p)
				continue
			}
			byName[name] = &Found{Name: name, Path: p}
		}
	}
	out := make([]Found, 0, len(byName))
	for _, f := range byName {
		out = append(out, *f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// FileSHA256 returns the hex SHA-256 of a file.
func FileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// LaunchOptions control how a plugin process is started.
type LaunchOptions struct {
	// SHA256, when set (hex), pins the plugin binary: go-plugin refuses to run
	// a file with another checksum.
	SHA256 string
	// Timeout bounds the start (handshake) and every call; 0: 2 minutes.
	Timeout time.Duration
}

// Plugin is a running fixer plugin.
type Plugin struct {
	Found
	SHA256 string
	Desc   Description

	timeout time.Duration
	client  *plugin.Client
	fixer   *fixerClient
	stderr  *tailBuffer

	mu sync.Mutex
}

// Launch starts a plugin, verifies it (SHA-256 when pinned, handshake) and asks
// it to Describe itself. The process is killed on any failure.
func Launch(ctx context.Context, f Found, o LaunchOptions) (*Plugin, error) {
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Minute
	}
	sum, err := FileSHA256(f.Path)
	if err != nil {
		return nil, fmt.Errorf("plugin %s: %w", f.Name, err)
	}
	p := &Plugin{Found: f, SHA256: sum, timeout: o.Timeout, stderr: &tailBuffer{max: 16 << 10}}
	cfg := &plugin.ClientConfig{
		HandshakeConfig:  Handshake,
		Plugins:          plugin.PluginSet{PluginName: &grpcPlugin{}},
		Cmd:              exec.Command(f.Path),
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		StartTimeout:     o.Timeout,
		Stderr:           p.stderr,
		SyncStderr:       p.stderr,
		Logger:           hclog.New(&hclog.LoggerOptions{Name: "plugin." + f.Name, Output: io.Discard, Level: hclog.Off}),
	}
	if o.SHA256 != "" {
		want, err := hex.DecodeString(strings.TrimSpace(o.SHA256))
		if err != nil || len(want) != sha256.Size {
			return nil, fmt.Errorf("plugin %s: pinned SHA-256 %q is not 64 hex digits", f.Name, o.SHA256)
		}
		cfg.SecureConfig = &plugin.SecureConfig{Checksum: want, Hash: sha256.New()}
	}
	p.client = plugin.NewClient(cfg)
	fail := func(what string, err error) (*Plugin, error) {
		exited := p.client.Exited()
		p.client.Kill()
		msg := err.Error()
		switch {
		case errors.Is(err, plugin.ErrChecksumsDoNotMatch):
			return nil, fmt.Errorf("plugin %s (%s): SHA-256 is %s, pinned %s: refusing to run it", f.Name, f.Path, sum, o.SHA256)
		case strings.Contains(msg, "timeout while waiting for plugin to start"):
			return nil, fmt.Errorf("plugin %s (%s): no handshake within %s: killed (hung)%s", f.Name, f.Path, o.Timeout, p.stderrNote())
		case strings.Contains(strings.ToLower(msg), "incompatible api version"):
			return nil, fmt.Errorf("plugin %s (%s): wrong handshake: %s (vmdk2kvm speaks fixer protocol %d)", f.Name, f.Path, msg, ProtocolVersion)
		case exited:
			return nil, fmt.Errorf("plugin %s (%s): the plugin process crashed or exited during the handshake%s", f.Name, f.Path, p.stderrNote())
		}
		if i := strings.IndexByte(msg, '\n'); i > 0 {
			msg = msg[:i]
		}
		return nil, fmt.Errorf("plugin %s (%s): %s: %s%s", f.Name, f.Path, what, msg, p.stderrNote())
	}
	rpc, err := p.client.Client()
	if err != nil {
		return fail("start", err)
	}
	raw, err := rpc.Dispense(PluginName)
	if err != nil {
		return fail("dispense", err)
	}
	fc, ok := raw.(*fixerClient)
	if !ok {
		return fail("dispense", fmt.Errorf("unexpected client type %T", raw))
	}
	p.fixer = fc
	var d *pb.Description
	err = p.call(ctx, "describe", func(ctx context.Context) (err error) {
		d, err = fc.client.Describe(ctx, &pb.DescribeRequest{})
		return err
	})
	if err != nil {
		p.client.Kill()
		return nil, err
	}
	p.Desc = DescriptionFromPB(d)
	if p.Desc.Name == "" {
		p.Desc.Name = f.Name
	}
	return p, nil
}

// Kill stops the plugin process.
func (p *Plugin) Kill() { p.client.Kill() }

// Exited reports whether the plugin process has exited.
func (p *Plugin) Exited() bool { return p.client.Exited() }

// Stderr returns the tail of what the plugin wrote to stderr.
func (p *Plugin) Stderr() string { return p.stderr.String() }

func (p *Plugin) stderrNote() string {
	s := strings.TrimSpace(p.stderr.String())
	if s == "" {
		return ""
	}
	if i := strings.Index(s, "panic: "); i >= 0 {
		// A Go panic: its message and the first frames say what happened.
		s = s[i:]
		if lines := strings.SplitN(s, "\n", 8); len(lines) == 8 {
			s = strings.Join(lines[:7], "\n") + "\n..."
		}
	}
	if len(s) > 2000 {
		s = "..." + s[len(s)-2000:]
	}
	return "; plugin stderr: " + s
}

// call runs one RPC under the plugin's timeout; a timeout or a crash kills the
// plugin and is reported as such.
func (p *Plugin) call(ctx context.Context, what string, fn func(context.Context) error) error {
	cctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	err := fn(cctx)
	if err == nil {
		return nil
	}
	switch {
	case ctx.Err() != nil:
		p.client.Kill()
		return fmt.Errorf("plugin %s: %s: cancelled: %w", p.Name, what, ctx.Err())
	case cctx.Err() != nil, status.Code(err) == codes.DeadlineExceeded:
		// (gRPC's own deadline timer may fire a moment before the context's.)
		p.client.Kill()
		return fmt.Errorf("plugin %s: %s: no answer within %s: killed (hung)", p.Name, what, p.timeout)
	}
	// Give a dying process a moment to be noticed.
	for i := 0; i < 20 && !p.client.Exited(); i++ {
		time.Sleep(25 * time.Millisecond)
	}
	if p.client.Exited() {
		time.Sleep(100 * time.Millisecond) // let go-plugin drain the dead plugin's stderr
		return fmt.Errorf("plugin %s: %s: the plugin process crashed: %v%s", p.Name, what, err, p.stderrNote())
	}
	return fmt.Errorf("plugin %s: %s: %w", p.Name, what, err)
}

// serveGuest brokers the recorder to the plugin under a fresh broker id: each
// id carries one connection (go-plugin sends its connection info once).
func (p *Plugin) serveGuest(rec *Recorder) uint32 {
	p.mu.Lock()
	defer p.mu.Unlock()
	id := p.fixer.broker.NextId()
	go p.fixer.broker.AcceptAndServe(id, func(opts []grpc.ServerOption) *grpc.Server {
		s := grpc.NewServer(append(opts, grpc.MaxRecvMsgSize(maxMsg), grpc.MaxSendMsgSize(maxMsg))...)
		pb.RegisterGuestServer(s, rec)
		return s
	})
	return id
}

// Plan asks the plugin for its plan; rec refuses mutations meanwhile.
func (p *Plugin) Plan(ctx context.Context, rec *Recorder, insp *pb.Inspection, opts map[string]string) (*pb.PlanResponse, error) {
	id := p.serveGuest(rec)
	rec.setWritable(false)
	var resp *pb.PlanResponse
	err := p.call(ctx, "plan", func(ctx context.Context) (err error) {
		resp, err = p.fixer.client.Plan(ctx, &pb.PlanRequest{GuestBrokerId: id, Inspection: insp, Options: opts})
		return err
	})
	return resp, err
}

// Apply asks the plugin to carry out the actions (ids; empty: its whole plan).
func (p *Plugin) Apply(ctx context.Context, rec *Recorder, insp *pb.Inspection, opts map[string]string, ids []string) (*pb.ApplyResponse, error) {
	id := p.serveGuest(rec)
	rec.setWritable(true)
	defer rec.setWritable(false)
	var resp *pb.ApplyResponse
	err := p.call(ctx, "apply", func(ctx context.Context) (err error) {
		resp, err = p.fixer.client.Apply(ctx, &pb.ApplyRequest{GuestBrokerId: id, Inspection: insp, Options: opts, ActionIds: ids})
		return err
	})
	return resp, err
}

// Order sorts plugins deterministically: by Order, then "after" constraints
// (a plugin runs after every present plugin it names), then by name.
func Order(ps []*Plugin) ([]*Plugin, error) {
	sorted := append([]*Plugin(nil), ps...)
	sort.SliceStable(sorted, func(i, j int) bool {
		if sorted[i].Desc.Order != sorted[j].Desc.Order {
			return sorted[i].Desc.Order < sorted[j].Desc.Order
		}
		return sorted[i].Name < sorted[j].Name
	})
	present := map[string]bool{}
	for _, p := range sorted {
		present[p.Desc.Name] = true
	}
	var out []*Plugin
	done := map[string]bool{}
	for len(out) < len(sorted) {
		progressed := false
		for _, p := range sorted {
			if done[p.Desc.Name] {
				continue
			}
			ready := true
			for _, a := range p.Desc.After {
				if present[a] && !done[a] && a != p.Desc.Name {
					ready = false
				}
			}
			if ready {
				out = append(out, p)
				done[p.Desc.Name] = true
				progressed = true
				break
			}
		}
		if !progressed {
			return nil, errors.New("plugins: \"after\" constraints form a cycle")
		}
	}
	return out, nil
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append([]byte(nil), t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
