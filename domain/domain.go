// Package domain maps a VMware VM (vmware.VMInfo) to a libvirt domain for
// KVM: a q35 machine with the VM's firmware (SeaBIOS, or OVMF with a per-VM
// NVRAM copy and, where the VM had it, secure boot), CPU topology, memory,
// disks on virtio-blk in the VM's boot order (or SATA for a first boot of a
// guest without virtio drivers), virtio NICs with the original MACs on mapped
// networks, a serial console and the guest agent channel.
package domain

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
	"libvirt.org/go/libvirtxml"

	"github.com/vmdk2kvm/vmdk2kvm/vmware"
)

// Firmware files of Debian's ovmf package (the 4 MiB builds).
const (
	OVMFCode       = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	OVMFVars       = "/usr/share/OVMF/OVMF_VARS_4M.fd"
	OVMFSecureCode = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
	OVMFSecureVars = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd" // Microsoft keys enrolled
	NVRAMDir       = "/var/lib/libvirt/qemu/nvram"
)

// Options shape the domain.
type Options struct {
	// Name of the domain (default: the VM's name).
	Name string
	// Type is "kvm", "qemu" (TCG) or "" to probe /dev/kvm.
	Type string
	// DiskPaths maps a VMware disk key to its converted file; disks without
	// an entry go to Dir/NAME-diskN.qcow2.
	DiskPaths map[int32]string
	// DiskFormat of the converted files (default qcow2).
	DiskFormat string
	// Dir receives the disks without an explicit path (default
	// /var/lib/libvirt/images).
	Dir string
	// NetworkMap maps vSphere network names to libvirt networks; unmapped
	// networks go to DefaultNetwork ("default") with a warning.
	NetworkMap     map[string]string
	DefaultNetwork string
	// SATA puts disks on SATA instead of virtio-blk (first boot of guests
	// without virtio drivers).
	SATA bool
	// Firmware file overrides (defaults: the OVMF* constants and NVRAMDir).
	OVMFCode, OVMFVars, NVRAM string
}

// Result is a domain and what the mapping could not carry over.
type Result struct {
	Domain   *libvirtxml.Domain
	Warnings []string
	// Disks lists, in domain order, the VMware disk key behind each target.
	Disks []DiskMap
}

// DiskMap ties a domain disk to its VMware disk.
type DiskMap struct {
	Key    int32  `json:"key"`
	Target string `json:"target"` // vda, sdb, ...
	File   string `json:"file"`
	Boot   uint   `json:"boot_order,omitempty"`
}

// ProbeType returns "kvm" when /dev/kvm can be opened and answers
// KVM_GET_API_VERSION, else "qemu" (TCG).
func ProbeType() string {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return "qemu"
	}
	defer f.Close()
	const kvmGetAPIVersion = 0xAE00
	v, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion)
	if err != nil || v != 12 {
		return "qemu"
	}
	return "kvm"
}

// IsWindows tells a Windows guest OS id.
func IsWindows(guestID string) bool {
	g := strings.ToLower(guestID)
	return strings.HasPrefix(g, "win") || strings.Contains(g, "windows")
}

// Build maps info to a domain.
func Build(info *vmware.VMInfo, o Options) (*Result, error) {
	if info == nil {
		return nil, errors.New("domain: no VM")
	}
	name := o.Name
	if name == "" {
		name = info.Name
	}
	if name == "" || strings.ContainsAny(name, "/\x00") {
		return nil, fmt.Errorf("domain: %q is not a usable domain name", name)
	}
	typ := o.Type
	if typ == "" {
		typ = ProbeType()
	}
	if typ != "kvm" && typ != "qemu" {
		return nil, fmt.Errorf("domain: type %q: want kvm or qemu", typ)
	}
	if info.CPUs <= 0 || info.MemoryMiB <= 0 {
		return nil, fmt.Errorf("domain: VM %s has %d CPUs and %d MiB of memory", info.Name, info.CPUs, info.MemoryMiB)
	}
	res := &Result{}
	win := IsWindows(info.GuestID)
	d := &libvirtxml.Domain{
		Type:        typ,
		Name:        name,
		UUID:        info.UUID,
		Title:       info.Name,
		Description: fmt.Sprintf("Migrated from vSphere VM %s (%s, guest %s) by vmdk2kvm", info.Path, info.MoRef, info.GuestID),
		Memory:      &libvirtxml.DomainMemory{Value: uint(info.MemoryMiB), Unit: "MiB"},
		VCPU:        &libvirtxml.DomainVCPU{Placement: "static", Value: uint(info.CPUs)},
		OS: &libvirtxml.DomainOS{
			Type: &libvirtxml.DomainOSType{Arch: "x86_64", Machine: "q35", Type: "hvm"},
		},
		Features: &libvirtxml.DomainFeatureList{
			ACPI: &libvirtxml.DomainFeature{},
			APIC: &libvirtxml.DomainFeatureAPIC{},
		},
		Clock:      &libvirtxml.DomainClock{Offset: "utc"},
		OnPoweroff: "destroy", OnReboot: "restart", OnCrash: "destroy",
		Devices: &libvirtxml.DomainDeviceList{},
	}
	cores := int(info.CoresPerSocket)
	if cores <= 0 || int(info.CPUs)%cores != 0 {
		cores = 1
	}
	d.CPU = &libvirtxml.DomainCPU{Topology: &libvirtxml.DomainCPUTopology{Sockets: int(info.CPUs) / cores, Cores: cores, Threads: 1}}
	if typ == "kvm" {
		d.CPU.Mode = "host-model"
	}
	if win {
		d.Clock = &libvirtxml.DomainClock{Offset: "localtime", Timer: []libvirtxml.DomainTimer{
			{Name: "rtc", TickPolicy: "catchup"}, {Name: "pit", TickPolicy: "delay"}, {Name: "hpet", Present: "no"},
		}}
		if typ == "kvm" {
			d.Features.HyperV = &libvirtxml.DomainFeatureHyperV{
				Relaxed:   &libvirtxml.DomainFeatureState{State: "on"},
				VAPIC:     &libvirtxml.DomainFeatureState{State: "on"},
				Spinlocks: &libvirtxml.DomainFeatureHyperVSpinlocks{DomainFeatureState: libvirtxml.DomainFeatureState{State: "on"}, Retries: 8191},
			}
			d.Clock.Timer = append(d.Clock.Timer, libvirtxml.DomainTimer{Name: "hypervclock", Present: "yes"})
		}
	}

	switch info.Firmware {
	case "efi":
		code, vars := pick(o.OVMFCode, OVMFCode), pick(o.OVMFVars, OVMFVars)
		if info.SecureBoot {
			code, vars = pick(o.OVMFCode, OVMFSecureCode), pick(o.OVMFVars, OVMFSecureVars)
			d.Features.SMM = &libvirtxml.DomainFeatureSMM{State: "on"}
		}
		d.OS.Loader = &libvirtxml.DomainLoader{Path: code, Readonly: "yes", Type: "pflash", Secure: yesNo(info.SecureBoot)}
		nv := o.NVRAM
		if nv == "" {
			nv = filepath.Join(NVRAMDir, name+"_VARS.fd")
		}
		d.OS.NVRam = &libvirtxml.DomainNVRam{NVRam: nv, Template: vars}
	case "bios", "":
		if info.SecureBoot {
			res.Warnings = append(res.Warnings, "secure boot is set on a BIOS VM: ignored")
		}
	default:
		return nil, fmt.Errorf("domain: VM %s has unknown firmware %q", info.Name, info.Firmware)
	}

	if err := addDisks(d, info, o, name, res); err != nil {
		return nil, err
	}
	addNICs(d, info, o, res)

	port := uint(0)
	pty := &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}}
	d.Devices.Serials = []libvirtxml.DomainSerial{{Source: pty, Target: &libvirtxml.DomainSerialTarget{Port: &port}}}
	d.Devices.Consoles = []libvirtxml.DomainConsole{{Source: pty, Target: &libvirtxml.DomainConsoleTarget{Type: "serial", Port: &port}}}
	d.Devices.Channels = []libvirtxml.DomainChannel{{
		Source: &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{Mode: "bind"}},
		Target: &libvirtxml.DomainChannelTarget{VirtIO: &libvirtxml.DomainChannelTargetVirtIO{Name: "org.qemu.guest_agent.0"}},
	}}
	d.Devices.Inputs = []libvirtxml.DomainInput{{Type: "tablet", Bus: "usb"}}
	d.Devices.Controllers = []libvirtxml.DomainController{{Type: "usb", Model: "qemu-xhci"}}
	d.Devices.Graphics = []libvirtxml.DomainGraphic{{VNC: &libvirtxml.DomainGraphicVNC{AutoPort: "yes", Listen: "127.0.0.1"}}}
	video := "virtio"
	if win {
		video = "vga" // no virtio-gpu driver in a stock Windows
	}
	d.Devices.Videos = []libvirtxml.DomainVideo{{Model: libvirtxml.DomainVideoModel{Type: video}}}
	d.Devices.RNGs = []libvirtxml.DomainRNG{{Model: "virtio", Backend: &libvirtxml.DomainRNGBackend{Random: &libvirtxml.DomainRNGBackendRandom{Device: "/dev/urandom"}}}}
	d.Devices.MemBalloon = &libvirtxml.DomainMemBalloon{Model: "virtio"}
	res.Domain = d
	return res, nil
}

func pick(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// bootOrder returns the VM's disks with the configured boot disks first (in
// their order), then the others in device order.
func bootOrder(info *vmware.VMInfo) []vmware.Disk {
	rank := map[int32]int{}
	for i, k := range info.BootOrder {
		if _, ok := rank[k]; !ok {
			rank[k] = i
		}
	}
	ds := append([]vmware.Disk(nil), info.Disks...)
	sort.SliceStable(ds, func(i, j int) bool {
		ri, oki := rank[ds[i].Key]
		rj, okj := rank[ds[j].Key]
		switch {
		case oki && okj:
			return ri < rj
		case oki != okj:
			return oki
		}
		return false
	})
	return ds
}

func addDisks(d *libvirtxml.Domain, info *vmware.VMInfo, o Options, name string, res *Result) error {
	format := pick(o.DiskFormat, "qcow2")
	dir := pick(o.Dir, "/var/lib/libvirt/images")
	bus, prefix := "virtio", "vd"
	if o.SATA {
		bus, prefix = "sata", "sd"
	}
	n := 0
	for i, disk := range bootOrder(info) {
		if strings.HasPrefix(disk.Provisioning, "rdm-physical") {
			res.Warnings = append(res.Warnings, fmt.Sprintf("disk %s (%s) is a physical-mode RDM: not in the domain; attach the LUN yourself", disk.Address, disk.File))
			continue
		}
		file := o.DiskPaths[disk.Key]
		if file == "" {
			file = filepath.Join(dir, fmt.Sprintf("%s-disk%d.%s", name, i, format))
		}
		boot := uint(n + 1)
		dev := prefix + driveLetters(n)
		dd := libvirtxml.DomainDisk{
			Device: "disk",
			Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: format, Discard: "unmap"},
			Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: file}},
			Target: &libvirtxml.DomainDiskTarget{Dev: dev, Bus: bus},
			Boot:   &libvirtxml.DomainDeviceBoot{Order: boot},
			Serial: serial(disk),
		}
		d.Devices.Disks = append(d.Devices.Disks, dd)
		res.Disks = append(res.Disks, DiskMap{Key: disk.Key, Target: dev, File: file, Boot: boot})
		n++
	}
	if n == 0 {
		return fmt.Errorf("domain: VM %s has no disk that can be converted", info.Name)
	}
	return nil
}

// serial keeps a recognisable disk serial (virtio-blk serials are at most 20
// characters), so guests that name disks by serial still find them.
func serial(d vmware.Disk) string {
	s := strings.NewReplacer(" ", "", "-", "").Replace(d.UUID)
	if len(s) > 20 {
		s = s[len(s)-20:]
	}
	return s
}

// driveLetters is 0→a, 25→z, 26→aa.
func driveLetters(i int) string {
	s := ""
	for i++; i > 0; i = (i - 1) / 26 {
		s = string(rune('a'+(i-1)%26)) + s
	}
	return s
}

func addNICs(d *libvirtxml.Domain, info *vmware.VMInfo, o Options, res *Result) {
	def := pick(o.DefaultNetwork, "default")
	for _, n := range info.NICs {
		target, ok := o.NetworkMap[n.Network]
		if !ok {
			target = def
			res.Warnings = append(res.Warnings, fmt.Sprintf("NIC %s on vSphere network %q has no --network-map entry: put on libvirt network %q", n.MAC, n.Network, def))
		}
		iface := libvirtxml.DomainInterface{
			MAC:    &libvirtxml.DomainInterfaceMAC{Address: strings.ToLower(n.MAC)},
			Source: &libvirtxml.DomainInterfaceSource{Network: &libvirtxml.DomainInterfaceSourceNetwork{Network: target}},
			Model:  &libvirtxml.DomainInterfaceModel{Type: "virtio"},
		}
		if !n.Connected {
			iface.Link = &libvirtxml.DomainInterfaceLink{State: "down"}
		}
		d.Devices.Interfaces = append(d.Devices.Interfaces, iface)
	}
}

// ParseNetworkMap parses "vsphere-net=libvirt-net" pairs.
func ParseNetworkMap(pairs []string) (map[string]string, error) {
	m := map[string]string{}
	for _, p := range pairs {
		from, to, ok := strings.Cut(p, "=")
		if !ok || from == "" || to == "" {
			return nil, fmt.Errorf("network map %q: want vsphere-network=libvirt-network", p)
		}
		m[from] = to
	}
	return m, nil
}
