package plugins

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/vmdk2kvm/vmdk2kvm/plugins/proto"
)

// maxMsg bounds one gRPC message (guest files such as initrds can be large).
const maxMsg = 256 << 20

// Mutation is one change made to the guest through the Guest API.
type Mutation struct {
	Plugin string    `json:"plugin"`
	Time   time.Time `json:"time"`
	Op     string    `json:"op"` // write, mkdir, remove, chmod, symlink, aug-set, command
	Path   string    `json:"path,omitempty"`
	Target string    `json:"target,omitempty"` // symlink target, aug value
	Mode   uint32    `json:"mode,omitempty"`
	Argv   []string  `json:"argv,omitempty"`
	Diff   string    `json:"diff,omitempty"`
	Output string    `json:"output,omitempty"` // command output (tail)
	Error  string    `json:"error,omitempty"`
}

// Journal is the host's record of every mutation, shared by all plugins of a run.
type Journal struct {
	mu sync.Mutex
	m  []Mutation
}

func (j *Journal) add(m Mutation) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.m = append(j.m, m)
}

// Entries returns a copy of the recorded mutations in order.
func (j *Journal) Entries() []Mutation {
	j.mu.Lock()
	defer j.mu.Unlock()
	return append([]Mutation(nil), j.m...)
}

// For returns the mutations made by one plugin.
func (j *Journal) For(plugin string) []Mutation {
	var out []Mutation
	for _, m := range j.Entries() {
		if m.Plugin == plugin {
			out = append(out, m)
		}
	}
	return out
}

// Recorder is the Guest service the host brokers to one plugin: it forwards to
// the guest helper and writes every mutation into the Journal. While the
// plugin plans, it refuses mutations.
type Recorder struct {
	pb.UnimplementedGuestServer
	plugin   string
	next     pb.GuestClient
	journal  *Journal
	writable atomic.Bool
}

// NewRecorder returns the recording Guest service for plugin, forwarding to next.
func NewRecorder(plugin string, next pb.GuestClient, j *Journal) *Recorder {
	return &Recorder{plugin: plugin, next: next, journal: j}
}

func (r *Recorder) setWritable(w bool) { r.writable.Store(w) }

func (r *Recorder) check(op, path string) error {
	if !r.writable.Load() {
		return status.Errorf(codes.PermissionDenied, "%s %s: the guest is read-only while planning", op, path)
	}
	return nil
}

func (r *Recorder) record(m Mutation, err error) {
	m.Plugin, m.Time = r.plugin, time.Now().UTC()
	if err != nil {
		m.Error = err.Error()
	}
	r.journal.add(m)
}

func (r *Recorder) Inspect(ctx context.Context, in *pb.Empty) (*pb.Inspection, error) {
	return r.next.Inspect(ctx, in)
}
func (r *Recorder) ReadFile(ctx context.Context, in *pb.PathRequest) (*pb.FileData, error) {
	return r.next.ReadFile(ctx, in)
}
func (r *Recorder) Stat(ctx context.Context, in *pb.PathRequest) (*pb.StatResponse, error) {
	return r.next.Stat(ctx, in)
}
func (r *Recorder) List(ctx context.Context, in *pb.PathRequest) (*pb.ListResponse, error) {
	return r.next.List(ctx, in)
}
func (r *Recorder) Readlink(ctx context.Context, in *pb.PathRequest) (*pb.ReadlinkResponse, error) {
	return r.next.Readlink(ctx, in)
}
func (r *Recorder) AugGet(ctx context.Context, in *pb.AugGetRequest) (*pb.AugGetResponse, error) {
	return r.next.AugGet(ctx, in)
}

func (r *Recorder) WriteFile(ctx context.Context, in *pb.WriteFileRequest) (*pb.Empty, error) {
	if err := r.check("write", in.Path); err != nil {
		return nil, err
	}
	var old []byte
	exists := false
	if st, err := r.next.Stat(ctx, &pb.PathRequest{Path: in.Path}); err == nil && st.Exists && st.IsRegular {
		if d, err := r.next.ReadFile(ctx, &pb.PathRequest{Path: in.Path}); err == nil {
			old, exists = d.Data, true
		}
	}
	out, err := r.next.WriteFile(ctx, in)
	r.record(Mutation{Op: "write", Path: in.Path, Mode: in.Mode, Diff: UnifiedDiff(in.Path, old, in.Data, exists)}, err)
	return out, err
}

func (r *Recorder) Mkdir(ctx context.Context, in *pb.MkdirRequest) (*pb.Empty, error) {
	if err := r.check("mkdir", in.Path); err != nil {
		return nil, err
	}
	out, err := r.next.Mkdir(ctx, in)
	r.record(Mutation{Op: "mkdir", Path: in.Path, Mode: in.Mode}, err)
	return out, err
}

func (r *Recorder) Remove(ctx context.Context, in *pb.RemoveRequest) (*pb.Empty, error) {
	if err := r.check("remove", in.Path); err != nil {
		return nil, err
	}
	var diff string
	if st, err := r.next.Stat(ctx, &pb.PathRequest{Path: in.Path}); err == nil && st.IsRegular {
		if d, err := r.next.ReadFile(ctx, &pb.PathRequest{Path: in.Path}); err == nil {
			diff = fmt.Sprintf("--- a%s\n+++ /dev/null\n", in.Path)
			if u := UnifiedDiff(in.Path, d.Data, nil, true); len(u) > 0 {
				diff = u
			}
		}
	}
	out, err := r.next.Remove(ctx, in)
	r.record(Mutation{Op: "remove", Path: in.Path, Diff: diff}, err)
	return out, err
}

func (r *Recorder) Chmod(ctx context.Context, in *pb.ChmodRequest) (*pb.Empty, error) {
	if err := r.check("chmod", in.Path); err != nil {
		return nil, err
	}
	out, err := r.next.Chmod(ctx, in)
	r.record(Mutation{Op: "chmod", Path: in.Path, Mode: in.Mode}, err)
	return out, err
}

func (r *Recorder) Symlink(ctx context.Context, in *pb.SymlinkRequest) (*pb.Empty, error) {
	if err := r.check("symlink", in.Link); err != nil {
		return nil, err
	}
	out, err := r.next.Symlink(ctx, in)
	r.record(Mutation{Op: "symlink", Path: in.Link, Target: in.Target}, err)
	return out, err
}

func (r *Recorder) AugSet(ctx context.Context, in *pb.AugSetRequest) (*pb.Empty, error) {
	if err := r.check("aug-set", in.Path); err != nil {
		return nil, err
	}
	out, err := r.next.AugSet(ctx, in)
	r.record(Mutation{Op: "aug-set", Path: in.Path, Target: in.Value}, err)
	return out, err
}

func (r *Recorder) Command(ctx context.Context, in *pb.CommandRequest) (*pb.CommandResponse, error) {
	if err := r.check("command", fmt.Sprint(in.Argv)); err != nil {
		return nil, err
	}
	out, err := r.next.Command(ctx, in)
	m := Mutation{Op: "command", Argv: in.Argv}
	if out != nil {
		m.Output = tail(out.Output, 4096)
		if out.Error != "" && err == nil {
			err = fmt.Errorf("%s", out.Error)
			r.record(m, err)
			return out, nil
		}
	}
	r.record(m, err)
	return out, err
}

// Shutdown is the host's alone.
func (r *Recorder) Shutdown(context.Context, *pb.Empty) (*pb.Empty, error) {
	return nil, status.Error(codes.PermissionDenied, "plugins may not shut the guest down")
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}
