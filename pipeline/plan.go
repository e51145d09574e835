package pipeline

// plan.go is the PLAN stage for a vSphere source: it reads everything about
// a VM, decides everything (data paths, sizes, targets, fixes, domain), and
// changes nothing. The Plan is printed for a person (WriteText) and saved as
// JSON or YAML that sync/convert load back (LoadPlan).

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/internal/units"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/vmdk2kvm/vmdk2kvm/domain"
	"github.com/vmdk2kvm/vmdk2kvm/vmware"
)

// PlanVersion is the schema version LoadPlan accepts.
const PlanVersion = 1

// DefaultRate is the copy rate estimates assume (100 MiB/s).
const DefaultRate = 100 << 20

// Plan is every decision of a migration, made before any is carried out.
type Plan struct {
	Version   int       `json:"version"`
	CreatedAt time.Time `json:"created_at"`
	Source    string    `json:"source"` // vsphere://user@vcenter/DC/vm/NAME (never a password)
	Server    string    `json:"server"`
	VM        PlanVM    `json:"vm"`
	// Snapshot is the point in time the plan read ("" = current state; a
	// running VM is then copied from a snapshot taken at copy time).
	Snapshot     string     `json:"snapshot,omitempty"`
	SnapshotName string     `json:"snapshot_name,omitempty"`
	Rate         int64      `json:"rate_bytes_per_second"`
	Disks        []PlanDisk `json:"disks"`
	Fixes        []PlanFix  `json:"fixes"`
	Domain       PlanDomain `json:"domain"`
	Totals       PlanTotals `json:"totals"`
	Warnings     []string   `json:"warnings,omitempty"`
}

// PlanVM is what the plan knows of the source VM.
type PlanVM struct {
	Name            string `json:"name"`
	MoRef           string `json:"moref"`
	Path            string `json:"path"`
	Datacenter      string `json:"datacenter"`
	UUID            string `json:"uuid"`
	InstanceUUID    string `json:"instance_uuid"`
	PowerState      string `json:"power_state"`
	Host            string `json:"host,omitempty"`
	GuestID         string `json:"guest_id"`
	OSFamily        string `json:"os_family"` // linux, windows, other
	Firmware        string `json:"firmware"`
	SecureBoot      bool   `json:"secure_boot"`
	CPUs            int32  `json:"cpus"`
	MemoryMiB       int64  `json:"memory_mib"`
	HardwareVersion string `json:"hardware_version"`
	CBT             bool   `json:"cbt"`
	Snapshots       int    `json:"snapshots"`
	CurrentSnapshot string `json:"current_snapshot,omitempty"`
}

// PlanDisk is one disk: where it is read, how much, where it goes.
type PlanDisk struct {
	Key            int32  `json:"key"`
	Label          string `json:"label"`
	Address        string `json:"address"`
	CapacityBytes  int64  `json:"capacity_bytes"`
	AllocatedBytes int64  `json:"allocated_bytes"`
	// AllocatedSource says where AllocatedBytes comes from: "cbt" (the
	// allocated areas QueryChangedDiskAreas("*") reports) or "capacity"
	// (no CBT answer: the whole disk is assumed).
	AllocatedSource  string          `json:"allocated_source"`
	EstimatedSeconds float64         `json:"estimated_seconds"`
	CBT              bool            `json:"cbt"`
	ChangeID         string          `json:"change_id,omitempty"`
	Chain            []vmware.Layer  `json:"chain"`
	Source           vmware.DiskPath `json:"source"`
	Target           PlanTarget      `json:"target"`
	// Skip says the disk is not copied (e.g. a physical RDM), and why.
	Skip string `json:"skip,omitempty"`
}

// PlanTarget is where a disk is written and how the domain attaches it.
type PlanTarget struct {
	File   string `json:"file"`
	Format string `json:"format"`
	Device string `json:"device,omitempty"` // vda, sdb, ...
	Bus    string `json:"bus,omitempty"`
	Boot   uint   `json:"boot_order,omitempty"`
}

// PlanFix is a fix a fixer plugin is expected to apply; inspection at FIX
// time refines the list (it is derived here from the guest OS id only).
type PlanFix struct {
	Fixer  string `json:"fixer"`
	Action string `json:"action"`
	Why    string `json:"why"`
}

// PlanDomain is the libvirt domain to define.
type PlanDomain struct {
	Name     string            `json:"name"`
	File     string            `json:"file"`
	Type     string            `json:"type"` // kvm or qemu
	Firmware string            `json:"firmware"`
	Loader   string            `json:"loader,omitempty"`
	NVRAM    string            `json:"nvram,omitempty"`
	DiskBus  string            `json:"disk_bus"`
	Networks map[string]string `json:"networks,omitempty"` // vSphere network → libvirt network
	NICs     []PlanNIC         `json:"nics"`
	XML      string            `json:"xml"`
}

// PlanNIC is a NIC as it moves.
type PlanNIC struct {
	MAC     string `json:"mac"`
	From    string `json:"from"` // vSphere network
	To      string `json:"to"`   // libvirt network
	Adapter string `json:"adapter"`
}

// PlanTotals sums the disks that are copied.
type PlanTotals struct {
	CapacityBytes    int64   `json:"capacity_bytes"`
	CopyBytes        int64   `json:"copy_bytes"`
	EstimatedSeconds float64 `json:"estimated_seconds"`
}

// PlanOptions are the user's choices.
type PlanOptions struct {
	Source     string // the URI, for the record
	Snapshot   string // read at this snapshot (name or MoRef); "" = current state
	Rate       int64  // bytes per second for estimates (default DefaultRate)
	OutputDir  string // target folder (default ".")
	Format     string // target format (default qcow2)
	DomainName string
	DomainType string // kvm, qemu, or "" to probe
	NetworkMap map[string]string
	SATA       bool
}

// PlanVSphere reads a VM and decides the migration. It changes nothing on
// the server: no snapshot is taken, CBT is not touched.
func PlanVSphere(ctx context.Context, c *vmware.Client, vm *vmware.VM, o PlanOptions) (*Plan, error) {
	info, err := c.Info(ctx, vm)
	if err != nil {
		return nil, err
	}
	paths, err := c.ResolveDisks(ctx, vm, o.Snapshot)
	if err != nil {
		return nil, err
	}
	disks, snapRef, err := c.DisksAt(ctx, vm, o.Snapshot)
	if err != nil {
		return nil, err
	}
	if o.Rate <= 0 {
		o.Rate = DefaultRate
	}
	if o.Format == "" {
		o.Format = "qcow2"
	}
	if o.OutputDir == "" {
		o.OutputDir = "."
	}
	name := o.DomainName
	if name == "" {
		name = info.Name
	}
	flat, _ := vmware.FlattenSnapshots(info.Snapshots)
	p := &Plan{
		Version: PlanVersion, CreatedAt: time.Now().UTC().Truncate(time.Second), Source: o.Source, Server: c.Host(),
		Snapshot: snapRef, Rate: o.Rate,
		VM: PlanVM{
			Name: info.Name, MoRef: info.MoRef, Path: info.Path, Datacenter: info.Datacenter, UUID: info.UUID, InstanceUUID: info.InstanceUUID,
			PowerState: info.PowerState, Host: info.Host, GuestID: info.GuestID, OSFamily: planOSFamily(info.GuestID),
			Firmware: info.Firmware, SecureBoot: info.SecureBoot, CPUs: info.CPUs, MemoryMiB: info.MemoryMiB,
			HardwareVersion: info.HardwareVersion, CBT: info.CBT, Snapshots: len(flat), CurrentSnapshot: info.CurrentSnapshot,
		},
	}
	for _, s := range flat {
		if s.MoRef == snapRef {
			p.SnapshotName = s.Name
		}
	}
	running := info.PowerState == "poweredOn"
	// CBT "*" needs a snapshot on a running VM: the plan's own, or the current one.
	cbtSnap := snapRef
	if cbtSnap == "" && running {
		cbtSnap = info.CurrentSnapshot
	}
	diskPaths := map[int32]string{}
	for i, d := range disks {
		pd := PlanDisk{Key: d.Key, Label: d.Label, Address: d.Address, CapacityBytes: d.CapacityBytes, CBT: d.CBT, ChangeID: d.ChangeID, Chain: d.Chain,
			AllocatedBytes: d.CapacityBytes, AllocatedSource: "capacity"}
		for _, dp := range paths {
			if dp.Key == d.Key {
				pd.Source = dp
			}
		}
		pd.Target = PlanTarget{File: filepath.Join(o.OutputDir, fmt.Sprintf("%s-disk%d.%s", name, i, o.Format)), Format: o.Format}
		if pd.Source.Method == "none" {
			pd.Skip = "no readable source: " + strings.Join(pd.Source.Warnings, "; ")
			pd.Target = PlanTarget{}
		} else {
			diskPaths[d.Key] = pd.Target.File
		}
		switch {
		case pd.Skip != "":
		case !info.CBT || !d.CBT:
		case running && cbtSnap == "":
			p.Warnings = append(p.Warnings, fmt.Sprintf("disk %s: allocation via CBT needs a snapshot of the running VM; the plan takes none, so the full capacity is assumed", d.Address))
		default:
			n, err := c.AllocatedBytes(ctx, vm, cbtSnap, d)
			if err != nil {
				p.Warnings = append(p.Warnings, fmt.Sprintf("disk %s: CBT did not report the allocated areas (%s); the full capacity is assumed", d.Address, planOneLine(err)))
			} else {
				pd.AllocatedBytes, pd.AllocatedSource = n, "cbt"
			}
		}
		if pd.Skip == "" {
			pd.EstimatedSeconds = float64(pd.AllocatedBytes) / float64(o.Rate)
			p.Totals.CapacityBytes += pd.CapacityBytes
			p.Totals.CopyBytes += pd.AllocatedBytes
			p.Totals.EstimatedSeconds += pd.EstimatedSeconds
		}
		p.Disks = append(p.Disks, pd)
	}

	// The domain, with exactly the target files above.
	forDomain := *info
	forDomain.Disks = disks
	res, err := domain.Build(&forDomain, domain.Options{Name: name, Type: o.DomainType, DiskPaths: diskPaths, DiskFormat: o.Format,
		Dir: o.OutputDir, NetworkMap: o.NetworkMap, SATA: o.SATA})
	if err != nil {
		return nil, err
	}
	xml, err := res.Domain.Marshal()
	if err != nil {
		return nil, fmt.Errorf("domain XML of %s: %w", name, err)
	}
	p.Domain = PlanDomain{Name: name, File: filepath.Join(o.OutputDir, name+".xml"), Type: res.Domain.Type, Firmware: info.Firmware,
		DiskBus: "virtio", Networks: o.NetworkMap, XML: xml}
	if o.SATA {
		p.Domain.DiskBus = "sata"
	}
	if l := res.Domain.OS.Loader; l != nil {
		p.Domain.Loader = l.Path
	}
	if n := res.Domain.OS.NVRam; n != nil {
		p.Domain.NVRAM = n.NVRam
	}
	for i, iface := range res.Domain.Devices.Interfaces {
		pn := PlanNIC{MAC: iface.MAC.Address, To: iface.Source.Network.Network}
		if i < len(info.NICs) {
			pn.From, pn.Adapter = info.NICs[i].Network, info.NICs[i].Adapter
		}
		p.Domain.NICs = append(p.Domain.NICs, pn)
	}
	for _, dm := range res.Disks {
		for i := range p.Disks {
			if p.Disks[i].Key == dm.Key {
				p.Disks[i].Target.Device, p.Disks[i].Target.Boot = dm.Target, dm.Boot
				p.Disks[i].Target.Bus = p.Domain.DiskBus
			}
		}
	}
	p.Fixes = planFixes(info, o.SATA)
	p.Warnings = append(p.Warnings, planWarnings(info, p, running)...)
	p.Warnings = append(p.Warnings, res.Warnings...)
	return p, nil
}

func planOneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", " ") }

func planOSFamily(guestID string) string {
	g := strings.ToLower(guestID)
	switch {
	case domain.IsWindows(g):
		return "windows"
	case g == "" || strings.HasPrefix(g, "other") && !strings.Contains(g, "linux"):
		return "other"
	case strings.Contains(g, "linux") || strings.HasPrefix(g, "debian") || strings.HasPrefix(g, "ubuntu") || strings.HasPrefix(g, "rhel") ||
		strings.HasPrefix(g, "centos") || strings.HasPrefix(g, "sles") || strings.HasPrefix(g, "oracle") || strings.HasPrefix(g, "fedora") ||
		strings.HasPrefix(g, "rocky") || strings.HasPrefix(g, "alma") || strings.HasPrefix(g, "amazonlinux") || strings.HasPrefix(g, "photon") ||
		strings.HasPrefix(g, "opensuse") || strings.HasPrefix(g, "coreos") || strings.HasPrefix(g, "asianux") || strings.HasPrefix(g, "mandriva"):
		return "linux"
	}
	return "other"
}

// planFixes lists the fixes expected from the guest OS id alone.
func planFixes(info *vmware.VMInfo, sata bool) []PlanFix {
	var out []PlanFix
	add := func(fixer, action, why string) { out = append(out, PlanFix{fixer, action, why}) }
	switch planOSFamily(info.GuestID) {
	case "linux":
		add("linux", "rewrite /etc/fstab, crypttab and boot loader root= to UUID=/PARTUUID=/LABEL=", "device names change from VMware SCSI/SATA to virtio (vdX)")
		add("linux", "add virtio_blk, virtio_scsi, virtio_net, virtio_pci to the initramfs and regenerate it", "the root disk moves to virtio-blk")
		add("linux", "regenerate the boot loader configuration (grub/extlinux)", "new root device and console")
		add("linux", "disable open-vm-tools / VMware Tools", "no VMware hypervisor underneath")
		add("linux", "move network configuration bound to old interface names or MACs", "NICs change from "+planAdapters(info)+" to virtio-net")
	case "windows":
		add("windows", "inject virtio-blk (viostor) and virtio-net (netkvm) drivers and register them as boot-critical", "the boot disk moves to virtio-blk")
		add("windows", "disable VMware Tools services", "no VMware hypervisor underneath")
		add("windows", "carry static IP settings over to the new virtio NICs", "NICs change from "+planAdapters(info)+" to virtio-net")
		if sata {
			add("windows", "first boot on SATA, then switch to virtio-blk", "--sata was asked")
		}
	default:
		add("none", "no built-in fixer recognises guest "+info.GuestID, "inspection at FIX time may still find the OS")
	}
	if info.Firmware == "efi" {
		add(planOSFamily(info.GuestID), "ensure the removable-media boot path (\\EFI\\BOOT\\BOOTX64.EFI) exists", "UEFI boot entries live in VMware's NVRAM and do not move")
	}
	return out
}

func planAdapters(info *vmware.VMInfo) string {
	seen := map[string]bool{}
	var out []string
	for _, n := range info.NICs {
		if !seen[n.Adapter] {
			seen[n.Adapter] = true
			out = append(out, n.Adapter)
		}
	}
	if len(out) == 0 {
		return "(none)"
	}
	return strings.Join(out, "/")
}

func planWarnings(info *vmware.VMInfo, p *Plan, running bool) []string {
	var w []string
	if !info.CBT {
		w = append(w, "CBT is off: a warm migration needs it (vmdk2kvm vsphere cbt enable "+info.Name+" --yes); a cold copy reads every allocated block")
	}
	if p.VM.Snapshots > 0 {
		w = append(w, fmt.Sprintf("%d snapshot(s) present: the copy flattens the chain as of %s; long chains slow reads", p.VM.Snapshots, planState(p)))
	}
	if running && p.Snapshot == "" {
		w = append(w, "the VM is running: convert/sync read from a snapshot they take at copy time; the guest keeps writing until cutover")
	}
	switch {
	case info.Firmware == "efi" && info.SecureBoot:
		w = append(w, "UEFI with secure boot: the domain uses OVMF with Microsoft keys enrolled; the NVRAM starts fresh")
	case info.Firmware == "efi":
		w = append(w, "UEFI: the domain uses OVMF; boot entries do not move (the fallback boot path is used)")
	}
	if p.VM.OSFamily == "other" {
		w = append(w, "guest OS "+info.GuestID+" is not one the built-in fixers know; the disks are copied unchanged")
	}
	// The same warning on several disks is printed once, naming them all.
	var order []string
	byMsg := map[string][]string{}
	for _, d := range p.Disks {
		for _, s := range d.Source.Warnings {
			if _, ok := byMsg[s]; !ok {
				order = append(order, s)
			}
			byMsg[s] = append(byMsg[s], d.Address)
		}
	}
	for _, s := range order {
		what := "disk "
		if len(byMsg[s]) > 1 {
			what = "disks "
		}
		w = append(w, what+strings.Join(byMsg[s], ", ")+": "+s)
	}
	return w
}

func planState(p *Plan) string {
	if p.Snapshot == "" {
		return "the current state"
	}
	return fmt.Sprintf("snapshot %q (%s)", p.SnapshotName, p.Snapshot)
}

// WriteJSON writes the plan as indented JSON.
func (p *Plan) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(p)
}

// WriteYAML writes the plan as YAML with the same field names as the JSON.
func (p *Plan) WriteYAML(w io.Writer) error {
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	var generic any
	if err := json.Unmarshal(b, &generic); err != nil {
		return err
	}
	enc := yaml.NewEncoder(w)
	enc.SetIndent(2)
	if err := enc.Encode(generic); err != nil {
		return err
	}
	return enc.Close()
}

// LoadPlan reads a plan written by WriteJSON or WriteYAML and checks it.
func LoadPlan(path string) (*Plan, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("plan: %w", err)
	}
	p, err := ParsePlan(b)
	if err != nil {
		return nil, fmt.Errorf("plan %s: %w", path, err)
	}
	return p, nil
}

// ParsePlan decodes a JSON or YAML plan and checks it.
func ParsePlan(b []byte) (*Plan, error) {
	trimmed := bytes.TrimSpace(b)
	if len(trimmed) == 0 {
		return nil, errors.New("empty")
	}
	if trimmed[0] != '{' {
		var generic any
		if err := yaml.Unmarshal(b, &generic); err != nil {
			return nil, fmt.Errorf("neither JSON nor YAML: %w", err)
		}
		j, err := json.Marshal(generic)
		if err != nil {
			return nil, fmt.Errorf("YAML: %w", err)
		}
		trimmed = j
	}
	var p Plan
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return nil, err
	}
	return &p, p.Check()
}

// Check verifies what sync/convert rely on.
func (p *Plan) Check() error {
	if p.Version != PlanVersion {
		return fmt.Errorf("version %d: this vmdk2kvm reads plan version %d", p.Version, PlanVersion)
	}
	if p.VM.MoRef == "" || p.Server == "" {
		return errors.New("vm.moref and server are required")
	}
	if p.Rate <= 0 {
		return fmt.Errorf("rate_bytes_per_second %d: must be positive", p.Rate)
	}
	seen := map[string]int32{}
	for i, d := range p.Disks {
		if d.CapacityBytes <= 0 {
			return fmt.Errorf("disks[%d] (key %d): capacity_bytes %d", i, d.Key, d.CapacityBytes)
		}
		if d.AllocatedBytes < 0 || d.AllocatedBytes > d.CapacityBytes {
			return fmt.Errorf("disks[%d] (key %d): allocated_bytes %d outside 0..%d", i, d.Key, d.AllocatedBytes, d.CapacityBytes)
		}
		if d.Skip != "" {
			continue
		}
		if d.Target.File == "" {
			return fmt.Errorf("disks[%d] (key %d): target.file is empty", i, d.Key)
		}
		if k, dup := seen[d.Target.File]; dup {
			return fmt.Errorf("disks[%d]: target.file %s is also the target of disk %d", i, d.Target.File, k)
		}
		seen[d.Target.File] = d.Key
	}
	return nil
}

// WriteText prints the plan for a person, in one screen.
func (p *Plan) WriteText(w io.Writer) error {
	bw := &planWriter{w: w}
	src := p.Source
	if src == "" {
		src = p.VM.Path
	}
	bw.printf("Plan for %s (read only: nothing was changed)\n", src)
	host := ""
	if p.VM.Host != "" {
		host = " on " + p.VM.Host
	}
	fw := strings.ToUpper(p.VM.Firmware)
	if p.VM.SecureBoot {
		fw += "+secure boot"
	}
	bw.printf("VM:     %s (%s) %s, %s%s\n", p.VM.Name, p.VM.MoRef, p.VM.Path, p.VM.PowerState, host)
	bw.printf("Guest:  %s (%s), %s, %d vCPU, %s, %s\n", p.VM.GuestID, p.VM.OSFamily, fw, p.VM.CPUs, units.Bytes(p.VM.MemoryMiB<<20), p.VM.HardwareVersion)
	cbt := "off"
	if p.VM.CBT {
		cbt = "on"
	}
	bw.printf("CBT:    %s; snapshots: %d; reading %s\n\n", cbt, p.VM.Snapshots, planState(p))
	tw := tabwriter.NewWriter(bw, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DISK\tSIZE\tTO COPY\tTIME\tREAD VIA\tCHAIN\tTARGET")
	for _, d := range p.Disks {
		via := d.Source.Method
		if d.Source.Pinned {
			via += " (host " + d.Source.Host + ")"
		}
		target := d.Target.File
		if d.Target.Device != "" {
			target += fmt.Sprintf(" (%s, boot %d)", d.Target.Device, d.Target.Boot)
		}
		cp := fmt.Sprintf("%s (%s)", units.Bytes(d.AllocatedBytes), d.AllocatedSource)
		tm := planDuration(d.EstimatedSeconds)
		if d.Skip != "" {
			cp, tm, target = "-", "-", "skipped"
		}
		var kinds []string
		for _, l := range d.Chain {
			kinds = append(kinds, l.Type)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.Address, units.Bytes(d.CapacityBytes), cp, tm, via, strings.Join(kinds, ">"), target)
	}
	tw.Flush()
	bw.printf("Total:  %s to copy of %s, about %s at %s/s\n\n", units.Bytes(p.Totals.CopyBytes), units.Bytes(p.Totals.CapacityBytes), planDuration(p.Totals.EstimatedSeconds), units.Bytes(p.Rate))
	bw.printf("Domain: %s (%s, q35, %s, disks on %s) -> %s\n", p.Domain.Name, p.Domain.Type, strings.ToUpper(p.Domain.Firmware), p.Domain.DiskBus, p.Domain.File)
	for _, n := range p.Domain.NICs {
		bw.printf("        NIC %s %s %q -> virtio on %q\n", n.MAC, n.Adapter, n.From, n.To)
	}
	bw.printf("Fixes (from the guest id; inspection refines them):\n")
	for _, f := range p.Fixes {
		bw.printf("  - [%s] %s\n", f.Fixer, f.Action)
	}
	if len(p.Warnings) > 0 {
		bw.printf("Warnings:\n")
		for _, s := range p.Warnings {
			bw.printf("  ! %s\n", s)
		}
	}
	return bw.err
}

type planWriter struct {
	w   io.Writer
	err error
}

func (e *planWriter) Write(b []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(b)
	e.err = err
	return n, err
}

func (e *planWriter) printf(format string, a ...any) { fmt.Fprintf(e, format, a...) }

func planDuration(secs float64) string {
	d := time.Duration(secs * float64(time.Second))
	switch {
	case d < time.Second:
		return "<1s"
	case d < time.Hour:
		return d.Round(time.Second).String()
	}
	return d.Round(time.Minute).String()
}
