package pipeline

import (
	"context"
	"errors"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/internal/units"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/vmdk2kvm/vmdk2kvm/cbt"
	"github.com/vmdk2kvm/vmdk2kvm/qcow2"
)

// Stopper is what a cutover needs from the control plane besides rounds.
type Stopper interface {
	Shutdown(ctx context.Context, timeout time.Duration, force bool) (string, error)
	Hardware(ctx context.Context) (Hardware, error)
}

// CutoverConfig configures a cutover.
type CutoverConfig struct {
	Syncer          *Syncer
	Source          Stopper
	ShutdownTimeout time.Duration // default 5 minutes
	Force           bool
	// Fix runs the fix stage on the boot disk's overlay (a qcow2 file over
	// the pristine replica) and returns a one-line summary; nil skips the
	// stage and reports SkipFixReason. cmd wires it to FixImage.
	Fix           func(ctx context.Context, overlay string) (string, error)
	SkipFixReason string
	// Domain, when set, writes the libvirt domain for the overlays (disk
	// key → overlay path) and returns the XML file's path; nil writes a
	// minimal virtio domain from the source's Hardware.
	Domain func(ctx context.Context, overlays map[string]string) (string, error)
	// BootTest, when set, boots the domain (its XML path) and says whether
	// the guest came up; nil reports the step as skipped.
	BootTest func(ctx context.Context, domainXML string) error
	// Now is the clock (tests); nil: time.Now.
	Now func() time.Time
}

// Cutover stops the guest, runs the final round, puts a qcow2 overlay on
// each pristine replica, runs the fix stage on the overlay (never on the
// replica, so a failed fix or boot test needs no re-copy and a later sync
// still works), writes the libvirt domain XML, and measures the downtime
// from the power-off to ready.
func Cutover(ctx context.Context, cfg CutoverConfig) (*Report, error) {
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 5 * time.Minute
	}
	s := cfg.Syncer
	var steps []Step
	step := func(name string, t0 time.Time, err error, detail string) error {
		st := Step{Name: name, Status: "done", Detail: detail, Seconds: now().Sub(t0).Seconds()}
		if err != nil {
			st.Status, st.Detail = "failed", err.Error()
		}
		steps = append(steps, st)
		return err
	}
	rep := func() *Report {
		r := NewReport(s.State, 0)
		r.Steps = steps
		return r
	}
	if len(s.State.Disks) == 0 {
		return nil, fmt.Errorf("%s holds no replica yet: run `vmdk2kvm sync` first", s.cfg.Target)
	}

	down := now()
	how, err := cfg.Source.Shutdown(ctx, cfg.ShutdownTimeout, cfg.Force)
	if step("shutdown", down, err, how) != nil {
		return rep(), fmt.Errorf("cutover: %w", err)
	}

	t0 := now()
	r, err := s.Round(ctx, "final")
	if step("final-round", t0, err, fmt.Sprintf("%s changed, %s read", units.Bytes(r.Totals.Changed), units.Bytes(r.Totals.Read))) != nil {
		return rep(), fmt.Errorf("cutover: final round: %w", err)
	}

	t0 = now()
	var overlays []string
	for _, d := range s.State.Disks {
		ov := overlayName(d.Replica)
		p := filepath.Join(s.cfg.Target, ov)
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return rep(), err
		}
		if err := qcow2.CreateOverlay(p, d.Replica, d.Format); err != nil {
			step("overlays", t0, err, "")
			return rep(), fmt.Errorf("cutover: %w", err)
		}
		overlays = append(overlays, ov)
	}
	step("overlays", t0, nil, strings.Join(overlays, ", ")+" over the pristine replicas")

	t0 = now()
	if cfg.Fix == nil {
		steps = append(steps, Step{Name: "fix", Status: "skipped", Detail: cfg.SkipFixReason})
	} else {
		detail, err := cfg.Fix(ctx, filepath.Join(s.cfg.Target, overlays[0]))
		if step("fix", t0, err, detail) != nil {
			return rep(), fmt.Errorf("cutover: fix stage failed on the overlay (the replicas are untouched; fix the cause and run cutover again, or keep syncing): %w", err)
		}
	}

	t0 = now()
	var xmlPath string
	if cfg.Domain != nil {
		paths := map[string]string{}
		for i, d := range s.State.Disks {
			p, aerr := filepath.Abs(filepath.Join(s.cfg.Target, overlays[i]))
			if aerr != nil {
				return rep(), aerr
			}
			paths[d.Key] = p
		}
		xmlPath, err = cfg.Domain(ctx, paths)
	} else {
		var hw Hardware
		if hw, err = cfg.Source.Hardware(ctx); err == nil {
			xmlPath, err = writeDomain(s.cfg.Target, hw, overlays)
		}
	}
	if step("domain-xml", t0, err, xmlPath) != nil {
		return rep(), fmt.Errorf("cutover: domain XML: %w", err)
	}

	t0 = now()
	if cfg.BootTest == nil {
		steps = append(steps, Step{Name: "boot-test", Status: "skipped", Detail: "not run by cutover (boot the domain with virsh, or validate its boot test)"})
	} else if step("boot-test", t0, cfg.BootTest(ctx, xmlPath), "") != nil {
		return rep(), fmt.Errorf("cutover: boot test failed (the replicas are untouched)")
	}

	downtime := now().Sub(down)
	s.State.Cutover = &cbt.CutoverInfo{At: down.UTC(), DowntimeSeconds: downtime.Seconds(), Overlays: overlays, DomainXML: filepath.Base(xmlPath)}
	if err := s.State.Save(s.path); err != nil {
		return rep(), err
	}
	return rep(), nil
}

func overlayName(replica string) string {
	return strings.TrimSuffix(replica, filepath.Ext(replica)) + ".cutover.qcow2"
}

// writeDomain writes a libvirt domain for the overlays: virtio disks and
// NICs, the VM's CPUs, memory and firmware.
func writeDomain(dir string, hw Hardware, overlays []string) (string, error) {
	name := sanitize(hw.Name)
	if name == "" {
		name = "migrated"
	}
	mem := uint(hw.MemoryMiB)
	if mem == 0 {
		mem = 1024
	}
	cpus := uint(hw.CPUs)
	if cpus == 0 {
		cpus = 1
	}
	dom := &libvirtxml.Domain{
		Type: "kvm", Name: name,
		Memory: &libvirtxml.DomainMemory{Value: mem, Unit: "MiB"},
		VCPU:   &libvirtxml.DomainVCPU{Value: cpus},
		OS: &libvirtxml.DomainOS{
			Type: &libvirtxml.DomainOSType{Arch: "x86_64", Machine: "q35", Type: "hvm"},
		},
		Features: &libvirtxml.DomainFeatureList{ACPI: &libvirtxml.DomainFeature{}, APIC: &libvirtxml.DomainFeatureAPIC{}},
		Devices:  &libvirtxml.DomainDeviceList{},
	}
	if hw.Firmware == "efi" {
		dom.OS.Firmware = "efi"
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for i, ov := range overlays {
		dom.Devices.Disks = append(dom.Devices.Disks, libvirtxml.DomainDisk{
			Device: "disk",
			Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "qcow2"},
			Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: filepath.Join(abs, ov)}},
			Target: &libvirtxml.DomainDiskTarget{Dev: "vd" + string(rune('a'+i)), Bus: "virtio"},
		})
	}
	for _, mac := range hw.MACs {
		dom.Devices.Interfaces = append(dom.Devices.Interfaces, libvirtxml.DomainInterface{
			MAC:    &libvirtxml.DomainInterfaceMAC{Address: mac},
			Source: &libvirtxml.DomainInterfaceSource{Network: &libvirtxml.DomainInterfaceSourceNetwork{Network: "default"}},
			Model:  &libvirtxml.DomainInterfaceModel{Type: "virtio"},
		})
	}
	x, err := dom.Marshal()
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, name+".xml")
	return p, cbt.WriteFileAtomic(p, []byte(x+"\n"), 0o644)
}
