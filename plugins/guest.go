package plugins

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/vmdk2kvm/vmdk2kvm/plugins/proto"
)

// Guest is a fixer's view of the guest: inspection results and file, Augeas and
// command operations, all carried out by the host (which records mutations).
// Paths are absolute paths in the guest.
type Guest struct {
	c        pb.GuestClient
	insp     *pb.Inspection
	opts     map[string]string
	warnings []string
}

// NewGuest wraps a Guest service client.
func NewGuest(c pb.GuestClient, insp *pb.Inspection, opts map[string]string) *Guest {
	if insp == nil {
		insp = &pb.Inspection{}
	}
	return &Guest{c: c, insp: insp, opts: opts}
}

// Inspection is what libguestfs found: OS, distro, root, filesystems, firmware.
func (g *Guest) Inspection() *pb.Inspection { return g.insp }

// Option returns a host-supplied option (e.g. "console" = "ttyS0"), or "".
func (g *Guest) Option(name string) string { return g.opts[name] }

// Warn adds a warning to the fixer's report.
func (g *Guest) Warn(format string, args ...any) {
	g.warnings = append(g.warnings, fmt.Sprintf(format, args...))
}

// wrap maps gRPC status codes back to fs errors so errors.Is works.
func wrap(op, p string, err error) error {
	if err == nil {
		return nil
	}
	switch status.Code(err) {
	case codes.NotFound:
		return &fs.PathError{Op: op, Path: p, Err: fs.ErrNotExist}
	case codes.PermissionDenied:
		return &fs.PathError{Op: op, Path: p, Err: fmt.Errorf("%w: %s", fs.ErrPermission, status.Convert(err).Message())}
	}
	return fmt.Errorf("guest %s %s: %w", op, p, err)
}

// ReadFile returns the content of a guest file (fs.ErrNotExist if missing).
func (g *Guest) ReadFile(ctx context.Context, p string) ([]byte, error) {
	r, err := g.c.ReadFile(ctx, &pb.PathRequest{Path: p})
	if err != nil {
		return nil, wrap("read", p, err)
	}
	if r.Data == nil {
		return []byte{}, nil
	}
	return r.Data, nil
}

// ReadFileIfExists is ReadFile returning (nil, nil) for a missing file.
func (g *Guest) ReadFileIfExists(ctx context.Context, p string) ([]byte, error) {
	b, err := g.ReadFile(ctx, p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	return b, err
}

// Stat describes a guest path (Exists false when missing; never follows a final symlink).
func (g *Guest) Stat(ctx context.Context, p string) (*pb.StatResponse, error) {
	r, err := g.c.Stat(ctx, &pb.PathRequest{Path: p})
	return r, wrap("stat", p, err)
}

// Exists reports whether a guest path exists.
func (g *Guest) Exists(ctx context.Context, p string) (bool, error) {
	st, err := g.Stat(ctx, p)
	if err != nil {
		return false, err
	}
	return st.Exists, nil
}

// List returns the names in a guest directory, sorted; a missing directory is empty.
func (g *Guest) List(ctx context.Context, dir string) ([]string, error) {
	r, err := g.c.List(ctx, &pb.PathRequest{Path: dir})
	if status.Code(err) == codes.NotFound {
		return nil, nil
	}
	if err != nil {
		return nil, wrap("list", dir, err)
	}
	return r.Names, nil
}

// Readlink returns a symlink's target.
func (g *Guest) Readlink(ctx context.Context, p string) (string, error) {
	r, err := g.c.Readlink(ctx, &pb.PathRequest{Path: p})
	if err != nil {
		return "", wrap("readlink", p, err)
	}
	return r.Target, nil
}

// WriteFile replaces a guest file's content (creating it, and its parents, with mode).
func (g *Guest) WriteFile(ctx context.Context, p string, data []byte, mode os.FileMode) error {
	_, err := g.c.WriteFile(ctx, &pb.WriteFileRequest{Path: p, Data: data, Mode: uint32(mode.Perm())})
	return wrap("write", p, err)
}

// Mkdir creates a directory (and its parents when parents is set).
func (g *Guest) Mkdir(ctx context.Context, p string, mode os.FileMode, parents bool) error {
	_, err := g.c.Mkdir(ctx, &pb.MkdirRequest{Path: p, Mode: uint32(mode.Perm()), Parents: parents})
	return wrap("mkdir", p, err)
}

// Remove deletes a file, or a directory tree when recursive.
func (g *Guest) Remove(ctx context.Context, p string, recursive bool) error {
	_, err := g.c.Remove(ctx, &pb.RemoveRequest{Path: p, Recursive: recursive})
	return wrap("remove", p, err)
}

// Chmod sets permission bits.
func (g *Guest) Chmod(ctx context.Context, p string, mode os.FileMode) error {
	_, err := g.c.Chmod(ctx, &pb.ChmodRequest{Path: p, Mode: uint32(mode.Perm())})
	return wrap("chmod", p, err)
}

// Symlink creates (or replaces) link pointing to target.
func (g *Guest) Symlink(ctx context.Context, target, link string) error {
	_, err := g.c.Symlink(ctx, &pb.SymlinkRequest{Target: target, Link: link})
	return wrap("symlink", link, err)
}

// AugGet reads an Augeas path (e.g. /files/etc/default/grub/GRUB_CMDLINE_LINUX).
func (g *Guest) AugGet(ctx context.Context, p string) (string, bool, error) {
	r, err := g.c.AugGet(ctx, &pb.AugGetRequest{Path: p})
	if err != nil {
		return "", false, wrap("aug-get", p, err)
	}
	return r.Value, r.Exists, nil
}

// AugSet sets an Augeas path and saves.
func (g *Guest) AugSet(ctx context.Context, p, value string) error {
	_, err := g.c.AugSet(ctx, &pb.AugSetRequest{Path: p, Value: value})
	return wrap("aug-set", p, err)
}

// Command runs argv inside the guest's root and returns its output.
func (g *Guest) Command(ctx context.Context, argv ...string) (string, error) {
	r, err := g.c.Command(ctx, &pb.CommandRequest{Argv: argv})
	if err != nil {
		return "", wrap("command", fmt.Sprint(argv), err)
	}
	if r.Error != "" {
		return r.Output, fmt.Errorf("guest command %v: %s", argv, r.Error)
	}
	return r.Output, nil
}

// perform carries out one change.
func (g *Guest) perform(ctx context.Context, c Change) error {
	switch c.Kind() {
	case "command":
		_, err := g.Command(ctx, c.Command...)
		return err
	case "remove":
		return g.Remove(ctx, c.Path, c.Recursive)
	case "symlink":
		if ok, err := g.Exists(ctx, path.Dir(c.Path)); err != nil {
			return err
		} else if !ok {
			if err := g.Mkdir(ctx, path.Dir(c.Path), 0o755, true); err != nil {
				return err
			}
		}
		return g.Symlink(ctx, c.LinkTarget, c.Path)
	default:
		mode := os.FileMode(c.Mode)
		if mode == 0 {
			mode = 0o644
		}
		return g.WriteFile(ctx, c.Path, c.New, mode)
	}
}
