package pipeline

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/filters"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
	"github.com/vmdk2kvm/vmdk2kvm/plugins"
	pb "github.com/vmdk2kvm/vmdk2kvm/plugins/proto"
	"github.com/vmdk2kvm/vmdk2kvm/qcow2"
)

// Fixer error policies.
const (
	OnErrorAbort    = "abort"    // a failing fixer stops the run; nothing is written
	OnErrorContinue = "continue" // a failing fixer is reported and skipped
)

// FixOptions configure the INSPECT → PLAN → FIX stages.
type FixOptions struct {
	// Helper is the vmdk2kvm-guest binary; "" finds it next to the running binary or on $PATH.
	Helper string
	// PluginDirs are searched in order (see plugins.SearchPath for the defaults added).
	PluginDirs []string
	// NoDefaultDirs searches only PluginDirs.
	NoDefaultDirs bool
	// PluginSHA256 pins plugins by name (without the vmdk2kvm-fixer- prefix) to a hex SHA-256.
	PluginSHA256 map[string]string
	// Timeout bounds each plugin call (describe, plan, apply); 0: 10 minutes.
	Timeout time.Duration
	// OnError is OnErrorAbort (default) or OnErrorContinue.
	OnError string
	// DryRun plans and changes nothing.
	DryRun bool
	// Options are passed to every plugin (e.g. "console": "ttyS0").
	Options map[string]string
	// Trace receives libguestfs's and plugins' diagnostics (nil: dropped).
	Trace io.Writer
	// Log receives one line per step (nil: dropped).
	Log io.Writer
}

func (o *FixOptions) logf(format string, args ...any) {
	if o.Log != nil {
		fmt.Fprintf(o.Log, "fix: "+format+"\n", args...)
	}
}

// FixError is returned when fixing stopped: the guest must not be used. The
// report is still filled in as far as the run got.
type FixError struct {
	Report *FixReport
	Err    error
}

func (e *FixError) Error() string { return e.Err.Error() }
func (e *FixError) Unwrap() error { return e.Err }

// FixDevice runs the fixers on a device: it is exported over NBD on a private
// unix socket to the guest helper. With DryRun the export is read-only (the
// helper's libguestfs throws its writes away); otherwise dev must be a
// block.Writable (for conversion, a filters.COW over the source) and receives
// every change.
func FixDevice(ctx context.Context, dev block.Device, name string, o FixOptions) (*FixReport, error) {
	writable := !o.DryRun
	if _, ok := dev.(block.Writable); writable && !ok {
		return nil, fmt.Errorf("fix %s: device is not writable", name)
	}
	dir, err := os.MkdirTemp("", "vmdk2kvm-fix-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "nbd.sock")
	srv, err := nbd.NewServer(nbd.ServerOptions{}, nbd.Export{Name: "", Description: name, Device: dev, Writable: writable})
	if err != nil {
		return nil, fmt.Errorf("fix %s: %w", name, err)
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("fix %s: %w", name, err)
	}
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(sctx, ln) }()
	defer func() {
		stop()
		<-served
	}()
	return fix(ctx, name, plugins.HelperOptions{Image: "nbd+unix:///?socket=" + sock, Format: "raw", ReadOnly: o.DryRun}, o)
}

// FixImage fixes an existing qcow2 or raw image through a new qcow2 overlay
// that is committed into it only when every fixer succeeded (or, with
// OnErrorContinue, was skipped); otherwise the image is left untouched. With
// DryRun the image is opened read-only.
// The format (qcow2 or raw) is read from the file.
func FixImage(ctx context.Context, image string, o FixOptions) (*FixReport, error) {
	format, err := imageFormat(image)
	if err != nil {
		return nil, fmt.Errorf("fix %s: %w", image, err)
	}
	if o.DryRun {
		return fix(ctx, image, plugins.HelperOptions{Image: image, Format: format, ReadOnly: true}, o)
	}
	overlay := image + ".fix-overlay.qcow2"
	if err := qcow2.CreateOverlay(overlay, filepath.Base(image), format); err != nil {
		return nil, fmt.Errorf("fix %s: %w", image, err)
	}
	defer os.Remove(overlay)
	rep, err := FixFile(ctx, overlay, "qcow2", o)
	if rep != nil {
		rep.Image = image
	}
	if err != nil {
		return rep, err
	}
	o.logf("committing the overlay into %s", image)
	if _, err := qcow2.Commit(ctx, overlay); err != nil {
		return rep, fmt.Errorf("fix %s: commit the fixes: %w", image, err)
	}
	return rep, nil
}

// imageFormat tells qcow2 from raw by the magic.
func imageFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var magic [4]byte
	if _, err := io.ReadFull(f, magic[:]); err != nil {
		return "", fmt.Errorf("read header: %w", err)
	}
	if string(magic[:]) == "QFI\xfb" {
		return "qcow2", nil
	}
	return "raw", nil
}

// FixFile fixes an image file in place (typically a qcow2 overlay the caller
// created over a pristine replica: on failure the caller drops the overlay).
func FixFile(ctx context.Context, path, format string, o FixOptions) (*FixReport, error) {
	return fix(ctx, path, plugins.HelperOptions{Image: path, Format: format, ReadOnly: o.DryRun}, o)
}

// NewFixOverlay wraps a source device in the copy-on-write overlay the fixers
// write into (the source is never written); dir holds its temporary file.
func NewFixOverlay(src block.Device, dir string) (*filters.COW, error) {
	return filters.NewCOW(src, filters.COWOptions{Dir: dir})
}

// fix launches the plugins, then the guest helper, and runs plan (and apply).
func fix(ctx context.Context, name string, ho plugins.HelperOptions, o FixOptions) (rep *FixReport, err error) {
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Minute
	}
	if o.OnError == "" {
		o.OnError = OnErrorAbort
	}
	if o.OnError != OnErrorAbort && o.OnError != OnErrorContinue {
		return nil, fmt.Errorf("--on-fixer-error: want %s or %s, got %q", OnErrorAbort, OnErrorContinue, o.OnError)
	}
	rep = &FixReport{Image: name, DryRun: o.DryRun, OnError: o.OnError, Started: time.Now().UTC()}
	fail := func(err error) (*FixReport, error) {
		rep.Finished = time.Now().UTC()
		rep.Error = err.Error()
		return rep, &FixError{Report: rep, Err: err}
	}

	// 1. Discover, verify and start every plugin before touching the guest.
	dirs := o.PluginDirs
	if !o.NoDefaultDirs {
		dirs = plugins.SearchPath(o.PluginDirs)
	}
	found, err := plugins.Discover(dirs)
	if err != nil {
		return fail(err)
	}
	for n := range o.PluginSHA256 {
		if !containsFound(found, n) {
			return fail(fmt.Errorf("plugin %s is pinned by --plugin-sha256 but was not found in %v", n, dirs))
		}
	}
	if len(found) == 0 {
		return fail(fmt.Errorf("no fixer plugins (%s*) found in %v", plugins.BinaryPrefix, dirs))
	}
	var running []*plugins.Plugin
	defer func() {
		for _, p := range running {
			p.Kill()
		}
	}()
	for _, f := range found {
		o.logf("starting plugin %s (%s)", f.Name, f.Path)
		p, err := plugins.Launch(ctx, f, plugins.LaunchOptions{SHA256: o.PluginSHA256[f.Name], Timeout: o.Timeout})
		if err != nil {
			pr := PluginReport{Name: f.Name, Path: f.Path, Status: StatusFailed, Error: err.Error()}
			rep.Plugins = append(rep.Plugins, pr)
			if o.OnError == OnErrorAbort {
				return fail(err)
			}
			o.logf("%v (continuing)", err)
			continue
		}
		running = append(running, p)
	}
	ordered, err := plugins.Order(running)
	if err != nil {
		return fail(err)
	}

	// 2. The guest: one libguestfs session for every plugin.
	if ho.Path == "" {
		ho.Path = o.Helper
	}
	if ho.Path == "" {
		if ho.Path, err = plugins.FindExecutable(plugins.HelperName, o.PluginDirs...); err != nil {
			return fail(err)
		}
	}
	ho.Trace = o.Trace
	o.logf("inspecting %s", name)
	helper, err := plugins.StartGuestHelper(ctx, ho)
	if err != nil {
		return fail(err)
	}
	closed := false
	defer func() {
		if !closed {
			helper.Close(context.WithoutCancel(ctx))
		}
	}()
	insp, err := helper.Client.Inspect(ctx, &pb.Empty{})
	if err != nil {
		return fail(fmt.Errorf("inspect %s: %w", name, err))
	}
	rep.Inspection = inspectionReport(insp)
	o.logf("guest: %s %s %d.%d (%s), root %s, %s", insp.OsType, insp.Distro, insp.Major, insp.Minor, insp.ProductName, insp.Root, insp.Firmware)

	// 3. Plan, then apply, plugin by plugin, in order.
	journal := &plugins.Journal{}
	var stopErr error
	for _, p := range ordered {
		pr := PluginReport{Name: p.Desc.Name, Version: p.Desc.Version, Path: p.Path, SHA256: p.SHA256, Summary: p.Desc.Summary}
		runErr := runPlugin(ctx, p, insp, helper.Client, journal, o, &pr)
		pr.Mutations = journal.For(p.Desc.Name)
		if runErr != nil {
			pr.Status, pr.Error = StatusFailed, runErr.Error()
			o.logf("plugin %s failed: %v", p.Desc.Name, runErr)
		}
		rep.Plugins = append(rep.Plugins, pr)
		if runErr != nil && o.OnError == OnErrorAbort {
			stopErr = runErr
			break
		}
	}
	closed = true
	if cerr := helper.Close(context.WithoutCancel(ctx)); cerr != nil && stopErr == nil {
		stopErr = cerr
	}
	if stopErr != nil {
		return fail(stopErr)
	}
	rep.Finished = time.Now().UTC()
	return rep, nil
}

func containsFound(fs []plugins.Found, name string) bool {
	for _, f := range fs {
		if f.Name == name {
			return true
		}
	}
	return false
}

func runPlugin(ctx context.Context, p *plugins.Plugin, insp *pb.Inspection, guest pb.GuestClient, j *plugins.Journal, o FixOptions, pr *PluginReport) error {
	if why := plugins.SkipReason(p.Desc, insp); why != "" {
		pr.Status, pr.SkipReason = StatusSkipped, why
		o.logf("plugin %s skipped: %s", p.Desc.Name, why)
		return nil
	}
	rec := plugins.NewRecorder(p.Desc.Name, guest, j)
	plan, err := p.Plan(ctx, rec, insp, o.Options)
	if err != nil {
		return err
	}
	pr.Warnings = append(pr.Warnings, plan.Warnings...)
	if plan.SkipReason != "" {
		pr.Status, pr.SkipReason = StatusSkipped, plan.SkipReason
		return nil
	}
	pr.Planned = actionReports(plan.Actions)
	o.logf("plugin %s plans %d action(s)", p.Desc.Name, len(plan.Actions))
	if len(plan.Actions) == 0 {
		pr.Status = StatusNothing
		return nil
	}
	if o.DryRun {
		pr.Status = StatusPlanned
		return nil
	}
	ids := make([]string, len(plan.Actions))
	for i, a := range plan.Actions {
		ids[i] = a.Id
	}
	res, err := p.Apply(ctx, rec, insp, o.Options, ids)
	if err != nil {
		return err
	}
	pr.Done = actionReports(res.Done)
	pr.Warnings = append(pr.Warnings, res.Warnings...)
	pr.Errors = res.Errors
	if len(res.Errors) > 0 {
		return errors.New("plugin " + p.Desc.Name + ": " + res.Errors[0])
	}
	if len(res.Done) != len(ids) {
		return fmt.Errorf("plugin %s: did %d of %d planned actions (the guest changed between plan and apply?)", p.Desc.Name, len(res.Done), len(ids))
	}
	pr.Status = StatusApplied
	return nil
}
