package plugins

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/vmdk2kvm/vmdk2kvm/plugins/proto"
)

// HelperName is the guest helper binary: the one process that links libguestfs.
const HelperName = "vmdk2kvm-guest"

// FindExecutable looks for a vmdk2kvm companion binary next to the running
// binary, then in dirs, then on $PATH.
func FindExecutable(name string, dirs ...string) (string, error) {
	var cands []string
	if exe, err := os.Executable(); err == nil {
		cands = append(cands, filepath.Join(filepath.Dir(exe), name))
	}
	for _, d := range dirs {
		cands = append(cands, filepath.Join(d, name))
	}
	for _, c := range cands {
		if st, err := os.Stat(c); err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0 {
			return c, nil
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%s not found next to %s, in %v or on $PATH (build it with make build)", name, os.Args[0], dirs)
}

// HelperOptions say which image the guest helper opens.
type HelperOptions struct {
	Path string // the vmdk2kvm-guest binary
	// Image is a file path or an NBD URI (nbd+unix:///?socket=...).
	Image    string
	Format   string // raw, qcow2, vmdk... ("" lets libguestfs probe: avoid)
	ReadOnly bool   // inspection/plan only: libguestfs writes to a throwaway overlay
	// Trace, when set, receives the helper's stderr (libguestfs messages).
	Trace io.Writer
	// StartTimeout bounds launch + inspection; 0: 10 minutes.
	StartTimeout time.Duration
}

// GuestHelper is a running vmdk2kvm-guest process serving the Guest API.
type GuestHelper struct {
	Client pb.GuestClient
	cmd    *exec.Cmd
	conn   *grpc.ClientConn
	dir    string
	stderr *tailBuffer
	done   chan error
}

// StartGuestHelper launches the guest helper on an image and waits until it has
// launched libguestfs, inspected the guest and mounted its filesystems.
func StartGuestHelper(ctx context.Context, o HelperOptions) (*GuestHelper, error) {
	if o.StartTimeout <= 0 {
		o.StartTimeout = 10 * time.Minute
	}
	dir, err := os.MkdirTemp("", "vmdk2kvm-guest-")
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, "guest.sock")
	args := []string{"--socket", sock, "--image", o.Image}
	if o.Format != "" {
		args = append(args, "--format", o.Format)
	}
	if o.ReadOnly {
		args = append(args, "--readonly")
	}
	h := &GuestHelper{dir: dir, stderr: &tailBuffer{max: 64 << 10}, done: make(chan error, 1)}
	h.cmd = exec.Command(o.Path, args...)
	var errw io.Writer = h.stderr
	if o.Trace != nil {
		errw = io.MultiWriter(h.stderr, o.Trace)
	}
	h.cmd.Stderr = errw
	stdin, err := h.cmd.StdinPipe() // closing it tells the helper to quit
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	_ = stdin
	stdout, err := h.cmd.StdoutPipe()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := h.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start %s: %w", o.Path, err)
	}
	go func() { h.done <- h.cmd.Wait() }()
	ready := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.TrimSpace(sc.Text()) == "READY" {
				ready <- nil
				io.Copy(io.Discard, stdout)
				return
			}
		}
		ready <- errors.New("exited before it was ready")
	}()
	timer := time.NewTimer(o.StartTimeout)
	defer timer.Stop()
	select {
	case err = <-ready:
	case <-timer.C:
		err = fmt.Errorf("not ready after %s", o.StartTimeout)
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		h.kill()
		return nil, fmt.Errorf("guest helper on %s: %w: %s", o.Image, err, strings.TrimSpace(tail(h.stderr.String(), 3000)))
	}
	h.conn, err = grpc.NewClient("unix://"+sock,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsg), grpc.MaxCallSendMsgSize(maxMsg)))
	if err != nil {
		h.kill()
		return nil, fmt.Errorf("guest helper: connect: %w", err)
	}
	h.Client = pb.NewGuestClient(h.conn)
	return h, nil
}

func (h *GuestHelper) kill() {
	if h.cmd.Process != nil {
		h.cmd.Process.Kill()
	}
	<-h.done
	h.done <- nil
	os.RemoveAll(h.dir)
}

// Stderr returns the tail of the helper's stderr.
func (h *GuestHelper) Stderr() string { return h.stderr.String() }

// Close syncs and unmounts the guest, shuts libguestfs down and waits for the
// helper to exit. Only after a nil Close are the guest's writes on disk.
func (h *GuestHelper) Close(ctx context.Context) error {
	sctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	_, serr := h.Client.Shutdown(sctx, &pb.Empty{})
	h.conn.Close()
	var werr error
	select {
	case werr = <-h.done:
		h.done <- werr
	case <-time.After(2 * time.Minute):
		h.cmd.Process.Kill()
		werr = <-h.done
		h.done <- werr
		werr = fmt.Errorf("did not exit after shutdown: killed")
	}
	os.RemoveAll(h.dir)
	if serr != nil {
		return fmt.Errorf("guest helper shutdown: %w: %s", serr, strings.TrimSpace(tail(h.stderr.String(), 2000)))
	}
	if werr != nil {
		return fmt.Errorf("guest helper: %w: %s", werr, strings.TrimSpace(tail(h.stderr.String(), 2000)))
	}
	return nil
}
