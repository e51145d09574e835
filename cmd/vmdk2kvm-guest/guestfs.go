//go:build cgo

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"sort"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"libguestfs.org/guestfs"

	pb "github.com/vmdk2kvm/vmdk2kvm/plugins/proto"
)

const maxMsg = 256 << 20

func run(o options) error {
	g, err := guestfs.Create()
	if err != nil {
		return fmt.Errorf("create libguestfs handle: %w", err)
	}
	srv := &server{g: g, readonly: o.readonly}
	defer srv.close()
	if err := srv.open(o); err != nil {
		return err
	}
	os.Remove(o.socket)
	l, err := net.Listen("unix", o.socket)
	if err != nil {
		return err
	}
	gs := grpc.NewServer(grpc.MaxRecvMsgSize(maxMsg), grpc.MaxSendMsgSize(maxMsg))
	pb.RegisterGuestServer(gs, srv)
	srv.stop = gs.GracefulStop
	go func() { // the host went away
		io.Copy(io.Discard, os.Stdin)
		gs.Stop()
	}()
	fmt.Println("READY")
	if err := gs.Serve(l); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return srv.shutdownErr
}

type server struct {
	pb.UnimplementedGuestServer
	mu          sync.Mutex // a libguestfs handle is not thread-safe
	g           *guestfs.Guestfs
	readonly    bool
	insp        *pb.Inspection
	augOpen     bool
	closed      bool
	stop        func()
	shutdownErr error
}

// kvmUsable: only when asked (VMDK2KVM_GUESTFS_KVM=1) and /dev/kvm opens.
func kvmUsable() bool {
	if os.Getenv("VMDK2KVM_GUESTFS_KVM") != "1" {
		return false
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

func (s *server) open(o options) error {
	g := s.g
	if err := g.Set_backend("direct"); err != nil {
		return fmt.Errorf("set backend: %w", err)
	}
	if !kvmUsable() {
		if err := g.Set_backend_settings([]string{"force_tcg"}); err != nil {
			return fmt.Errorf("force TCG: %w", err)
		}
	}
	opt := &guestfs.OptargsAdd_drive{Readonly_is_set: true, Readonly: o.readonly}
	if o.format != "" {
		opt.Format_is_set, opt.Format = true, o.format
	}
	name := o.image
	if strings.HasPrefix(o.image, "nbd") {
		u, err := url.Parse(o.image)
		if err != nil {
			return fmt.Errorf("NBD URI %q: %w", o.image, err)
		}
		opt.Protocol_is_set, opt.Protocol = true, "nbd"
		name = strings.TrimPrefix(u.Path, "/")
		if sock := u.Query().Get("socket"); sock != "" {
			opt.Server_is_set, opt.Server = true, []string{"unix:" + sock}
		} else {
			opt.Server_is_set, opt.Server = true, []string{u.Host}
		}
	}
	if err := g.Add_drive(name, opt); err != nil {
		return fmt.Errorf("add %s: %w", o.image, err)
	}
	if err := g.Launch(); err != nil {
		return fmt.Errorf("launch libguestfs on %s: %w", o.image, err)
	}
	insp, err := s.inspect()
	if err != nil {
		return err
	}
	s.insp = insp
	return nil
}

// inspect runs libguestfs inspection and mounts the guest's filesystems.
func (s *server) inspect() (*pb.Inspection, error) {
	g := s.g
	in := &pb.Inspection{OsType: "unknown", Firmware: "bios"}
	disks, err := g.List_devices()
	if err != nil {
		return nil, fmt.Errorf("list devices: %w", err)
	}
	in.Disks = disks
	for _, d := range disks {
		pt, err := g.Part_get_parttype(d)
		if err != nil {
			pt = ""
		}
		in.PartitionTables = append(in.PartitionTables, pt)
	}
	roots, err := g.Inspect_os()
	if err != nil {
		return nil, fmt.Errorf("inspect: %w", err)
	}
	mounts := map[string]string{}
	if len(roots) > 0 {
		root := roots[0]
		in.Root = root
		in.OsType, _ = g.Inspect_get_type(root)
		in.Distro, _ = g.Inspect_get_distro(root)
		if v, err := g.Inspect_get_major_version(root); err == nil {
			in.Major = int32(v)
		}
		if v, err := g.Inspect_get_minor_version(root); err == nil {
			in.Minor = int32(v)
		}
		in.ProductName, _ = g.Inspect_get_product_name(root)
		in.Hostname, _ = g.Inspect_get_hostname(root)
		in.Arch, _ = g.Inspect_get_arch(root)
		in.PackageFormat, _ = g.Inspect_get_package_format(root)
		if m, err := g.Inspect_get_mountpoints(root); err == nil {
			mounts = m
		}
		// libguestfs passes fstab specs it cannot resolve through unchanged
		// (e.g. /dev/disk/by-path/...): the root is the inspected root; other
		// unresolved mounts are skipped (fixers resolve them themselves).
		mounts["/"] = root
		for mp, dev := range mounts {
			if mp == "/" {
				continue
			}
			if _, err := g.Vfs_type(dev); err != nil {
				delete(mounts, mp)
			}
		}
		// Mount shortest mountpoint first.
		mps := make([]string, 0, len(mounts))
		for mp := range mounts {
			mps = append(mps, mp)
		}
		sort.Slice(mps, func(i, j int) bool { return len(mps[i]) < len(mps[j]) || len(mps[i]) == len(mps[j]) && mps[i] < mps[j] })
		for _, mp := range mps {
			var err error
			if s.readonly {
				err = g.Mount_ro(mounts[mp], mp)
			} else {
				err = g.Mount(mounts[mp], mp)
			}
			if err != nil && mp == "/" {
				return nil, fmt.Errorf("mount root %s: %w", mounts[mp], err)
			}
		}
		if _, ok := mounts["/boot/efi"]; ok {
			in.Firmware = "uefi"
		}
	}
	byDev := map[string]string{}
	for mp, dev := range mounts {
		byDev[dev] = mp
	}
	fss, err := g.List_filesystems()
	if err != nil {
		return nil, fmt.Errorf("list filesystems: %w", err)
	}
	devs := make([]string, 0, len(fss))
	for d := range fss {
		devs = append(devs, d)
	}
	sort.Strings(devs)
	for _, d := range devs {
		fs := &pb.Filesystem{Device: d, Type: fss[d], Mountpoint: byDev[d]}
		if fs.Type != "unknown" {
			fs.Uuid, _ = g.Vfs_uuid(d)
			fs.Label, _ = g.Vfs_label(d)
		}
		if n, err := g.Part_to_partnum(d); err == nil {
			if disk, err := g.Part_to_dev(d); err == nil {
				if pt, _ := g.Part_get_parttype(disk); pt == "gpt" {
					fs.Partuuid, _ = g.Part_get_gpt_guid(disk, n)
					if t, err := g.Part_get_gpt_type(disk, n); err == nil && strings.EqualFold(t, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B") && fs.Mountpoint != "" {
						in.Firmware = "uefi"
					}
				}
			}
		}
		in.Filesystems = append(in.Filesystems, fs)
	}
	return in, nil
}

func (s *server) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	s.g.Close()
}

// gerr maps a libguestfs error to a gRPC status (ENOENT → NotFound).
func gerr(err error) error {
	if err == nil {
		return nil
	}
	var ge *guestfs.GuestfsError
	if errors.As(err, &ge) {
		if ge.Errno == 2 { // ENOENT
			return status.Error(codes.NotFound, ge.Error())
		}
		return status.Error(codes.Unknown, ge.Error())
	}
	return status.Error(codes.Unknown, err.Error())
}

func (s *server) lock() (func(), error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, status.Error(codes.Unavailable, "guest is shut down")
	}
	return s.mu.Unlock, nil
}

func (s *server) exists(p string) (bool, error) {
	ok, err := s.g.Exists(p)
	return ok, err
}

func (s *server) Inspect(context.Context, *pb.Empty) (*pb.Inspection, error) { return s.insp, nil }

func (s *server) ReadFile(_ context.Context, in *pb.PathRequest) (*pb.FileData, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if ok, err := s.exists(in.Path); err == nil && !ok {
		return nil, status.Errorf(codes.NotFound, "%s: no such file", in.Path)
	}
	if size, err := s.g.Filesize(in.Path); err == nil && size > smallFile {
		// read_file is bounded by libguestfs's message size: stream it.
		if size > maxMsg-4096 {
			return nil, status.Errorf(codes.ResourceExhausted, "%s is %d bytes, more than the Guest API carries (%d)", in.Path, size, maxMsg)
		}
		d, err := s.download(in.Path)
		if err != nil {
			return nil, gerr(err)
		}
		return &pb.FileData{Data: d}, nil
	}
	d, err := s.g.Read_file(in.Path)
	if err != nil {
		return nil, gerr(err)
	}
	return &pb.FileData{Data: d}, nil
}

func (s *server) WriteFile(_ context.Context, in *pb.WriteFileRequest) (*pb.Empty, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	existed, _ := s.exists(in.Path)
	if !existed {
		if i := strings.LastIndex(in.Path, "/"); i > 0 {
			if err := s.g.Mkdir_p(in.Path[:i]); err != nil {
				return nil, gerr(err)
			}
		}
	}
	if len(in.Data) > smallFile {
		err = s.upload(in.Path, in.Data)
	} else {
		err = s.g.Write(in.Path, in.Data)
	}
	if err != nil {
		return nil, gerr(err)
	}
	if !existed || in.Mode != 0 {
		mode := int(in.Mode)
		if mode == 0 {
			mode = 0o644
		}
		if err := s.g.Chmod(mode, in.Path); err != nil {
			return nil, gerr(err)
		}
	}
	return &pb.Empty{}, nil
}

// smallFile is what read_file/write carry in one libguestfs message; larger
// files go through download/upload (a temporary host file).
const smallFile = 1 << 20

func (s *server) download(p string) ([]byte, error) {
	f, err := os.CreateTemp("", "vmdk2kvm-guest-dl-")
	if err != nil {
		return nil, err
	}
	f.Close()
	defer os.Remove(f.Name())
	if err := s.g.Download(p, f.Name()); err != nil {
		return nil, err
	}
	return os.ReadFile(f.Name())
}

func (s *server) upload(p string, data []byte) error {
	f, err := os.CreateTemp("", "vmdk2kvm-guest-ul-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return s.g.Upload(f.Name(), p)
}

func (s *server) Stat(_ context.Context, in *pb.PathRequest) (*pb.StatResponse, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	st, err := s.g.Lstatns(in.Path)
	if err != nil {
		if e := gerr(err); status.Code(e) == codes.NotFound {
			return &pb.StatResponse{Exists: false}, nil
		}
		// Lstat of a path under a missing directory: also "does not exist".
		if ok, xerr := s.exists(in.Path); xerr == nil && !ok {
			if l, _ := s.g.Is_symlink(in.Path); !l {
				return &pb.StatResponse{Exists: false}, nil
			}
		}
		return nil, gerr(err)
	}
	m := uint32(st.St_mode)
	const ifmt, ifdir, iflnk, ifreg = 0o170000, 0o040000, 0o120000, 0o100000
	return &pb.StatResponse{Exists: true, Mode: m, Size: st.St_size,
		IsDir: m&ifmt == ifdir, IsSymlink: m&ifmt == iflnk, IsRegular: m&ifmt == ifreg}, nil
}

func (s *server) List(_ context.Context, in *pb.PathRequest) (*pb.ListResponse, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if ok, err := s.g.Is_dir(in.Path, nil); err == nil && !ok {
		return nil, status.Errorf(codes.NotFound, "%s: no such directory", in.Path)
	}
	names, err := s.g.Ls(in.Path)
	if err != nil {
		return nil, gerr(err)
	}
	sort.Strings(names)
	return &pb.ListResponse{Names: names}, nil
}

func (s *server) Readlink(_ context.Context, in *pb.PathRequest) (*pb.ReadlinkResponse, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	t, err := s.g.Readlink(in.Path)
	if err != nil {
		return nil, gerr(err)
	}
	return &pb.ReadlinkResponse{Target: t}, nil
}

func (s *server) Mkdir(_ context.Context, in *pb.MkdirRequest) (*pb.Empty, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if in.Parents {
		err = s.g.Mkdir_p(in.Path)
	} else {
		err = s.g.Mkdir(in.Path)
	}
	if err == nil && in.Mode != 0 {
		err = s.g.Chmod(int(in.Mode), in.Path)
	}
	if err != nil {
		return nil, gerr(err)
	}
	return &pb.Empty{}, nil
}

func (s *server) Remove(_ context.Context, in *pb.RemoveRequest) (*pb.Empty, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if in.Recursive {
		err = s.g.Rm_rf(in.Path)
	} else if dir, _ := s.g.Is_dir(in.Path, &guestfs.OptargsIs_dir{Followsymlinks_is_set: true, Followsymlinks: false}); dir {
		err = s.g.Rmdir(in.Path)
	} else {
		err = s.g.Rm(in.Path)
	}
	if err != nil {
		return nil, gerr(err)
	}
	return &pb.Empty{}, nil
}

func (s *server) Chmod(_ context.Context, in *pb.ChmodRequest) (*pb.Empty, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := s.g.Chmod(int(in.Mode), in.Path); err != nil {
		return nil, gerr(err)
	}
	return &pb.Empty{}, nil
}

func (s *server) Symlink(_ context.Context, in *pb.SymlinkRequest) (*pb.Empty, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := s.g.Ln_sf(in.Target, in.Link); err != nil {
		return nil, gerr(err)
	}
	return &pb.Empty{}, nil
}

func (s *server) augInit() error {
	if s.augOpen {
		return s.g.Aug_load()
	}
	if err := s.g.Aug_init("/", 0); err != nil {
		return err
	}
	s.augOpen = true
	return nil
}

func (s *server) AugGet(_ context.Context, in *pb.AugGetRequest) (*pb.AugGetResponse, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := s.augInit(); err != nil {
		return nil, gerr(err)
	}
	m, err := s.g.Aug_match(in.Path)
	if err != nil {
		return nil, gerr(err)
	}
	if len(m) == 0 {
		return &pb.AugGetResponse{}, nil
	}
	v, err := s.g.Aug_get(in.Path)
	if err != nil {
		return nil, gerr(err)
	}
	return &pb.AugGetResponse{Value: v, Exists: true}, nil
}

func (s *server) AugSet(_ context.Context, in *pb.AugSetRequest) (*pb.Empty, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := s.augInit(); err != nil {
		return nil, gerr(err)
	}
	if err := s.g.Aug_set(in.Path, in.Value); err != nil {
		return nil, gerr(err)
	}
	if err := s.g.Aug_save(); err != nil {
		return nil, gerr(err)
	}
	return &pb.Empty{}, nil
}

func (s *server) Command(_ context.Context, in *pb.CommandRequest) (*pb.CommandResponse, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if len(in.Argv) == 0 {
		return nil, status.Error(codes.InvalidArgument, "empty command")
	}
	out, err := s.g.Command(in.Argv)
	if err != nil {
		return &pb.CommandResponse{Output: out, ExitCode: -1, Error: err.Error()}, nil
	}
	return &pb.CommandResponse{Output: out}, nil
}

func (s *server) Shutdown(context.Context, *pb.Empty) (*pb.Empty, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	if s.augOpen {
		s.g.Aug_close()
	}
	if err := s.g.Umount_all(); err != nil {
		s.shutdownErr = fmt.Errorf("unmount: %w", err)
	}
	if err := s.g.Shutdown(); err != nil && s.shutdownErr == nil {
		s.shutdownErr = fmt.Errorf("shutdown: %w", err)
	}
	s.closed = true
	s.g.Close()
	unlock()
	go s.stop()
	if s.shutdownErr != nil {
		return nil, status.Error(codes.Internal, s.shutdownErr.Error())
	}
	return &pb.Empty{}, nil
}
