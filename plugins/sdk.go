package plugins

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	pb "github.com/vmdk2kvm/vmdk2kvm/plugins/proto"
)

// Description is what a fixer says about itself (see pb.Description).
type Description struct {
	Name    string
	Version string
	Summary string
	// OSTypes and Distros use libguestfs's names ("linux", "debian"); empty: any.
	OSTypes []string
	Distros []string
	// MinVersion/MaxVersion bound the guest's major.minor version; "": none.
	MinVersion, MaxVersion string
	// Order: lower runs first; ties by name. After: fixers to run before this one.
	Order int
	After []string
}

// Change is one thing a fixer wants done. Exactly one of these shapes:
//   - file edit or creation: Path, Old (nil if the file does not exist), New, Mode;
//   - removal: Path, Remove (Recursive for directories);
//   - symlink: Path (the link), LinkTarget;
//   - command run in the guest's root: Command (argv).
type Change struct {
	Summary    string
	Path       string
	Old, New   []byte
	Exists     bool // the file exists (Old is its content)
	Mode       uint32
	Remove     bool
	Recursive  bool
	LinkTarget string
	Command    []string
}

// Kind names the shape of the change: edit, create, remove, symlink or command.
func (c Change) Kind() string {
	switch {
	case len(c.Command) > 0:
		return "command"
	case c.Remove:
		return "remove"
	case c.LinkTarget != "":
		return "symlink"
	case c.Exists:
		return "edit"
	default:
		return "create"
	}
}

// EditFile returns the change that makes path hold want, or nothing when it
// already does. old is the current content (nil: the file does not exist).
func EditFile(summary, path string, old, want []byte, mode uint32) []Change {
	if old != nil && bytes.Equal(old, want) {
		return nil
	}
	return []Change{{Summary: summary, Path: path, Old: old, New: want, Exists: old != nil, Mode: mode}}
}

// Fixer is what a plugin implements. Plan reads the guest through g and returns
// the changes it wants; it must not mutate the guest (the host refuses). Apply
// plans again and performs the changes through the Guest API.
type Fixer interface {
	Describe() Description
	Plan(ctx context.Context, g *Guest) ([]Change, error)
}

// Serve runs f as a plugin process: call it from main. It does not return
// while the host is connected. Run by hand, it prints a hint and exits 1.
func Serve(f Fixer) {
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: Handshake,
		Plugins:         plugin.PluginSet{PluginName: &grpcPlugin{impl: &fixerServer{fixer: f}}},
		GRPCServer:      plugin.DefaultGRPCServer,
		Logger: hclog.New(&hclog.LoggerOptions{
			Name: "fixer", Output: os.Stderr, Level: hclog.Warn,
		}),
	})
}

// fixerServer serves pb.Fixer from a Fixer.
type fixerServer struct {
	pb.UnimplementedFixerServer
	fixer  Fixer
	broker *plugin.GRPCBroker
}

func (s *fixerServer) Describe(context.Context, *pb.DescribeRequest) (*pb.Description, error) {
	return descriptionToPB(s.fixer.Describe()), nil
}

func (s *fixerServer) guest(id uint32, insp *pb.Inspection, opts map[string]string) (*Guest, *grpc.ClientConn, error) {
	if s.broker == nil {
		return nil, nil, errors.New("no broker: the fixer was not started by go-plugin")
	}
	conn, err := s.broker.Dial(id)
	if err != nil {
		return nil, nil, fmt.Errorf("dial the host's guest service: %w", err)
	}
	return NewGuest(pb.NewGuestClient(conn), insp, opts), conn, nil
}

func (s *fixerServer) plan(ctx context.Context, id uint32, insp *pb.Inspection, opts map[string]string) (*Guest, *grpc.ClientConn, []Change, []*pb.Action, error) {
	g, conn, err := s.guest(id, insp, opts)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	changes, err := s.fixer.Plan(ctx, g)
	if err != nil {
		conn.Close()
		return nil, nil, nil, nil, err
	}
	return g, conn, changes, Actions(changes), nil
}

func (s *fixerServer) Plan(ctx context.Context, req *pb.PlanRequest) (*pb.PlanResponse, error) {
	if why := SkipReason(s.fixer.Describe(), req.Inspection); why != "" {
		return &pb.PlanResponse{SkipReason: why}, nil
	}
	g, conn, _, actions, err := s.plan(ctx, req.GuestBrokerId, req.Inspection, req.Options)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return &pb.PlanResponse{Actions: actions, Warnings: g.warnings}, nil
}

func (s *fixerServer) Apply(ctx context.Context, req *pb.ApplyRequest) (*pb.ApplyResponse, error) {
	if why := SkipReason(s.fixer.Describe(), req.Inspection); why != "" {
		return &pb.ApplyResponse{Warnings: []string{"skipped: " + why}}, nil
	}
	g, conn, changes, actions, err := s.plan(ctx, req.GuestBrokerId, req.Inspection, req.Options)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	resp := &pb.ApplyResponse{}
	for i, c := range changes {
		if len(req.ActionIds) > 0 && !slices.Contains(req.ActionIds, actions[i].Id) {
			continue
		}
		if err := g.perform(ctx, c); err != nil {
			resp.Errors = append(resp.Errors, fmt.Sprintf("%s: %v", c.Summary, err))
			break // later changes may depend on this one
		}
		resp.Done = append(resp.Done, actions[i])
	}
	resp.Warnings = g.warnings
	return resp, nil
}

// Actions turns changes into protocol actions: stable ids, sentences, diffs.
func Actions(changes []Change) []*pb.Action {
	out := make([]*pb.Action, 0, len(changes))
	for i, c := range changes {
		a := &pb.Action{Summary: c.Summary, Kind: c.Kind(), Path: c.Path, Command: c.Command}
		switch a.Kind {
		case "edit", "create":
			old := c.Old
			a.Diff = UnifiedDiff(c.Path, old, c.New, c.Exists)
		case "symlink":
			a.Diff = fmt.Sprintf("symlink %s -> %s\n", c.Path, c.LinkTarget)
		}
		h := sha256.Sum256([]byte(a.Kind + "\x00" + a.Path + "\x00" + a.Summary + "\x00" + strings.Join(a.Command, "\x00")))
		a.Id = fmt.Sprintf("%02d-%s", i+1, hex.EncodeToString(h[:4]))
		out = append(out, a)
	}
	return out
}

// SkipReason says why a fixer described by d does not apply to the inspected
// guest, or "" when it does.
func SkipReason(d Description, in *pb.Inspection) string {
	if in == nil {
		return "no inspection"
	}
	if len(d.OSTypes) > 0 && !slices.Contains(d.OSTypes, in.OsType) {
		return fmt.Sprintf("applies to %s guests, this one is %q", strings.Join(d.OSTypes, "/"), in.OsType)
	}
	if len(d.Distros) > 0 && !slices.Contains(d.Distros, in.Distro) {
		return fmt.Sprintf("applies to %s, this guest is %q", strings.Join(d.Distros, "/"), in.Distro)
	}
	v := [2]int{int(in.Major), int(in.Minor)}
	if d.MinVersion != "" && cmpVersion(v, parseVersion(d.MinVersion)) < 0 {
		return fmt.Sprintf("needs version >= %s, guest is %d.%d", d.MinVersion, in.Major, in.Minor)
	}
	if d.MaxVersion != "" && cmpVersion(v, parseVersion(d.MaxVersion)) > 0 {
		return fmt.Sprintf("needs version <= %s, guest is %d.%d", d.MaxVersion, in.Major, in.Minor)
	}
	return ""
}

func parseVersion(s string) [2]int {
	var v [2]int
	fmt.Sscanf(s, "%d.%d", &v[0], &v[1])
	return v
}

func cmpVersion(a, b [2]int) int {
	if a[0] != b[0] {
		return a[0] - b[0]
	}
	return a[1] - b[1]
}

func descriptionToPB(d Description) *pb.Description {
	return &pb.Description{
		Name: d.Name, Version: d.Version, Summary: d.Summary, Order: int32(d.Order), After: d.After,
		Applies: &pb.Applies{OsTypes: d.OSTypes, Distros: d.Distros, MinVersion: d.MinVersion, MaxVersion: d.MaxVersion},
	}
}

// DescriptionFromPB converts a plugin's answer to Describe.
func DescriptionFromPB(p *pb.Description) Description {
	d := Description{Name: p.GetName(), Version: p.GetVersion(), Summary: p.GetSummary(), Order: int(p.GetOrder()), After: p.GetAfter()}
	if a := p.GetApplies(); a != nil {
		d.OSTypes, d.Distros, d.MinVersion, d.MaxVersion = a.OsTypes, a.Distros, a.MinVersion, a.MaxVersion
	}
	return d
}
