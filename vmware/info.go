package vmware

import (
	"context"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// VMInfo is everything the control plane knows about a VM.
type VMInfo struct {
	Name            string `json:"name"`
	MoRef           string `json:"moref"`
	Path            string `json:"path"`
	Datacenter      string `json:"datacenter"`
	DCPath          string `json:"dc_path"`
	UUID            string `json:"uuid"`          // BIOS UUID
	InstanceUUID    string `json:"instance_uuid"` // vCenter's
	PowerState      string `json:"power_state"`
	Firmware        string `json:"firmware"` // bios or efi
	SecureBoot      bool   `json:"secure_boot"`
	GuestID         string `json:"guest_id"`
	GuestFullName   string `json:"guest_full_name,omitempty"`
	HardwareVersion string `json:"hardware_version"`
	CPUs            int32  `json:"cpus"`
	CoresPerSocket  int32  `json:"cores_per_socket"`
	MemoryMiB       int64  `json:"memory_mib"`
	Host            string `json:"host,omitempty"`
	HostMoRef       string `json:"host_moref,omitempty"`
	VMXPath         string `json:"vmx_path"`
	// CBT is the VM's changeTrackingEnabled; CBTSupported its capability.
	CBT             bool         `json:"cbt"`
	CBTSupported    bool         `json:"cbt_supported"`
	NICs            []NIC        `json:"nics"`
	Controllers     []Controller `json:"controllers"`
	Disks           []Disk       `json:"disks"`
	BootOrder       []int32      `json:"boot_order,omitempty"` // disk keys, as configured
	Snapshots       []Snapshot   `json:"snapshots,omitempty"`
	CurrentSnapshot string       `json:"current_snapshot,omitempty"` // MoRef
}

// NIC is a virtual network adapter.
type NIC struct {
	Key          int32  `json:"key"`
	Label        string `json:"label"`
	Adapter      string `json:"adapter"` // vmxnet3, e1000e, e1000, vmxnet2, pcnet32, sriov
	MAC          string `json:"mac"`
	AddressType  string `json:"address_type,omitempty"`
	Network      string `json:"network"`
	NetworkMoRef string `json:"network_moref,omitempty"`
	Connected    bool   `json:"start_connected"`
}

// Controller is a storage controller.
type Controller struct {
	Key   int32  `json:"key"`
	Name  string `json:"name"` // scsi0, sata0, nvme0, ide0
	Type  string `json:"type"` // pvscsi, lsilogic, lsilogic-sas, buslogic, ahci, nvme, ide
	Bus   int32  `json:"bus"`
	Label string `json:"label"`
}

// Disk is a virtual disk at one state (current, or a snapshot's).
type Disk struct {
	Key            int32  `json:"key"`
	Label          string `json:"label"`
	CapacityBytes  int64  `json:"capacity_bytes"`
	ControllerKey  int32  `json:"controller_key"`
	ControllerType string `json:"controller_type"`
	Unit           int32  `json:"unit"`
	Address        string `json:"address"` // scsi0:1
	File           string `json:"file"`    // top of the chain, "[ds] dir/name.vmdk"
	Datastore      string `json:"datastore"`
	Provisioning   string `json:"provisioning"` // thin, thick-lazy, thick-eager, rdm-physical, rdm-virtual
	Mode           string `json:"mode"`         // persistent, independent_persistent, ...
	Independent    bool   `json:"independent"`
	UUID           string `json:"uuid,omitempty"`
	CBT            bool   `json:"cbt"`
	ChangeID       string `json:"change_id,omitempty"`
	// Chain lists the backing layers, top (the file written now) first.
	Chain []Layer `json:"chain"`
}

// Layer is one file of a disk's backing chain.
type Layer struct {
	File        string   `json:"file"` // descriptor, "[ds] path"
	Type        string   `json:"type"` // flat, vmfsSparse, seSparse, sparse, rdm, unsupported
	DeltaFormat string   `json:"delta_format,omitempty"`
	DataFiles   []string `json:"data_files,omitempty"` // the extent files holding the bytes
	Parent      string   `json:"parent,omitempty"`
	Datastore   string   `json:"datastore"`
	Backing     string   `json:"backing"` // the vSphere backing type
}

// Snapshot is one node of the snapshot tree.
type Snapshot struct {
	Name        string     `json:"name"`
	MoRef       string     `json:"moref"`
	ID          int32      `json:"id"`
	Description string     `json:"description,omitempty"`
	Created     time.Time  `json:"created"`
	PowerState  string     `json:"power_state"`
	Quiesced    bool       `json:"quiesced"`
	Current     bool       `json:"current"`
	Children    []Snapshot `json:"children,omitempty"`
}

// vmProps are the properties Info reads.
var vmProps = []string{"name", "config", "runtime", "snapshot", "layoutEx", "capability"}

// Info describes a VM at its current state.
func (c *Client) Info(ctx context.Context, vm *VM) (*VMInfo, error) {
	var m mo.VirtualMachine
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, vm.Ref, vmProps, &m); err != nil {
		return nil, fmt.Errorf("read VM %s: %w", vm.Path, err)
	}
	if m.Config == nil {
		return nil, fmt.Errorf("VM %s has no configuration (inaccessible or orphaned?)", vm.Path)
	}
	info := &VMInfo{
		Name: m.Name, MoRef: m.Self.Value, Path: vm.Path, Datacenter: vm.Datacenter, DCPath: vm.DCPath,
		UUID: m.Config.Uuid, InstanceUUID: m.Config.InstanceUuid,
		PowerState: string(m.Runtime.PowerState),
		Firmware:   m.Config.Firmware,
		GuestID:    m.Config.GuestId, GuestFullName: m.Config.GuestFullName,
		HardwareVersion: m.Config.Version,
		CPUs:            m.Config.Hardware.NumCPU, CoresPerSocket: 1,
		MemoryMiB:    int64(m.Config.Hardware.MemoryMB),
		VMXPath:      m.Config.Files.VmPathName,
		CBTSupported: m.Capability.ChangeTrackingSupported,
	}
	if n := m.Config.Hardware.NumCoresPerSocket; n != nil && *n > 0 {
		info.CoresPerSocket = *n
	}
	if info.Firmware == "" {
		info.Firmware = "bios"
	}
	if m.Config.ChangeTrackingEnabled != nil {
		info.CBT = *m.Config.ChangeTrackingEnabled
	}
	if b := m.Config.BootOptions; b != nil {
		info.SecureBoot = b.EfiSecureBootEnabled != nil && *b.EfiSecureBootEnabled
		for _, d := range b.BootOrder {
			if dd, ok := d.(*types.VirtualMachineBootOptionsBootableDiskDevice); ok {
				info.BootOrder = append(info.BootOrder, dd.DeviceKey)
			}
		}
	}
	names := newNamer(c)
	if h := m.Runtime.Host; h != nil {
		info.HostMoRef = h.Value
		names.want(*h)
	}
	devs := object.VirtualDeviceList(m.Config.Hardware.Device)
	for _, d := range devs {
		if n, ok := d.(types.BaseVirtualEthernetCard); ok {
			if ref := nicNetworkRef(n.GetVirtualEthernetCard()); ref != nil {
				names.want(*ref)
			}
		}
		if disk, ok := d.(*types.VirtualDisk); ok {
			for _, l := range backingChain(disk.Backing) {
				if l.ds != nil {
					names.want(*l.ds)
				}
			}
		}
	}
	if err := names.resolve(ctx); err != nil {
		return nil, err
	}
	if info.HostMoRef != "" {
		info.Host = names.name(*m.Runtime.Host)
	}
	extra := map[string]string{}
	for _, o := range m.Config.ExtraConfig {
		if ov := o.GetOptionValue(); ov != nil {
			extra[ov.Key] = fmt.Sprint(ov.Value)
		}
	}
	info.Controllers, info.NICs = controllers(devs), nics(devs, names)
	var layout []types.VirtualMachineFileLayoutExDiskLayout
	if m.LayoutEx != nil {
		layout = m.LayoutEx.Disk
	}
	info.Disks = disks(devs, info.Controllers, extra, info.CBT, names, m.LayoutEx, layout)
	if m.Snapshot != nil {
		cur := ""
		if m.Snapshot.CurrentSnapshot != nil {
			cur = m.Snapshot.CurrentSnapshot.Value
			info.CurrentSnapshot = cur
		}
		info.Snapshots = snapshotTree(m.Snapshot.RootSnapshotList, cur)
	}
	return info, nil
}

// namer resolves MoRefs to names in one property-collector call.
type namer struct {
	c     *Client
	refs  []types.ManagedObjectReference
	names map[types.ManagedObjectReference]string
}

func newNamer(c *Client) *namer {
	return &namer{c: c, names: map[types.ManagedObjectReference]string{}}
}

func (n *namer) want(r types.ManagedObjectReference) {
	if _, ok := n.names[r]; !ok {
		n.names[r] = ""
		n.refs = append(n.refs, r)
	}
}

func (n *namer) resolve(ctx context.Context) error {
	if len(n.refs) == 0 {
		return nil
	}
	// Raw contents: mo.ManagedEntity does not decode every type (port groups).
	var ocs []types.ObjectContent
	if err := property.DefaultCollector(n.c.vim).Retrieve(ctx, n.refs, []string{"name"}, &ocs); err != nil {
		return fmt.Errorf("read names: %w", err)
	}
	for _, oc := range ocs {
		for _, p := range oc.PropSet {
			if s, ok := p.Val.(string); ok && p.Name == "name" {
				n.names[oc.Obj] = s
			}
		}
	}
	return nil
}

func (n *namer) name(r types.ManagedObjectReference) string {
	if s := n.names[r]; s != "" {
		return s
	}
	return r.Value
}

func nicNetworkRef(c *types.VirtualEthernetCard) *types.ManagedObjectReference {
	switch b := c.Backing.(type) {
	case *types.VirtualEthernetCardNetworkBackingInfo:
		return b.Network
	case *types.VirtualEthernetCardDistributedVirtualPortBackingInfo:
		return &types.ManagedObjectReference{Type: "DistributedVirtualPortgroup", Value: b.Port.PortgroupKey}
	}
	return nil
}

func nics(devs object.VirtualDeviceList, names *namer) []NIC {
	var out []NIC
	for _, d := range devs {
		n, ok := d.(types.BaseVirtualEthernetCard)
		if !ok {
			continue
		}
		c := n.GetVirtualEthernetCard()
		nic := NIC{Key: c.Key, Label: label(c.DeviceInfo), Adapter: adapterType(d), MAC: c.MacAddress, AddressType: c.AddressType}
		if c.Connectable != nil {
			nic.Connected = c.Connectable.StartConnected
		}
		switch b := c.Backing.(type) {
		case *types.VirtualEthernetCardNetworkBackingInfo:
			nic.Network = b.DeviceName
			if b.Network != nil {
				nic.NetworkMoRef = b.Network.Value
			}
		case *types.VirtualEthernetCardDistributedVirtualPortBackingInfo:
			ref := nicNetworkRef(c)
			nic.Network, nic.NetworkMoRef = names.name(*ref), ref.Value
		case *types.VirtualEthernetCardOpaqueNetworkBackingInfo:
			nic.Network = b.OpaqueNetworkId
		}
		out = append(out, nic)
	}
	return out
}

func adapterType(d types.BaseVirtualDevice) string {
	switch d.(type) {
	case *types.VirtualVmxnet3, *types.VirtualVmxnet3Vrdma:
		return "vmxnet3"
	case *types.VirtualVmxnet2:
		return "vmxnet2"
	case *types.VirtualVmxnet:
		return "vmxnet"
	case *types.VirtualE1000e:
		return "e1000e"
	case *types.VirtualE1000:
		return "e1000"
	case *types.VirtualPCNet32:
		return "pcnet32"
	case *types.VirtualSriovEthernetCard:
		return "sriov"
	}
	return "unknown"
}

func label(d types.BaseDescription) string {
	if d == nil {
		return ""
	}
	if x := d.GetDescription(); x != nil {
		return x.Label
	}
	return ""
}

func controllers(devs object.VirtualDeviceList) []Controller {
	var out []Controller
	for _, d := range devs {
		bc, ok := d.(types.BaseVirtualController)
		if !ok {
			continue
		}
		c := bc.GetVirtualController()
		var kind, prefix string
		switch d.(type) {
		case *types.ParaVirtualSCSIController:
			kind, prefix = "pvscsi", "scsi"
		case *types.VirtualLsiLogicController:
			kind, prefix = "lsilogic", "scsi"
		case *types.VirtualLsiLogicSASController:
			kind, prefix = "lsilogic-sas", "scsi"
		case *types.VirtualBusLogicController:
			kind, prefix = "buslogic", "scsi"
		case *types.VirtualAHCIController, *types.VirtualSATAController:
			kind, prefix = "ahci", "sata"
		case *types.VirtualNVMEController:
			kind, prefix = "nvme", "nvme"
		case *types.VirtualIDEController:
			kind, prefix = "ide", "ide"
		default:
			continue // PCI, PS/2, SIO, USB: not storage
		}
		out = append(out, Controller{Key: c.Key, Name: fmt.Sprintf("%s%d", prefix, c.BusNumber), Type: kind, Bus: c.BusNumber, Label: label(c.DeviceInfo)})
	}
	return out
}

// chainLayer is one backing of a chain, before names are resolved.
type chainLayer struct {
	file, kind, delta, backing string
	ds                         *types.ManagedObjectReference
}

// backingChain walks a disk backing and its parents, top first.
func backingChain(b types.BaseVirtualDeviceBackingInfo) []chainLayer {
	var out []chainLayer
	for b != nil {
		l := chainLayer{backing: strings.TrimPrefix(fmt.Sprintf("%T", b), "*types.")}
		var next types.BaseVirtualDeviceBackingInfo
		switch x := b.(type) {
		case *types.VirtualDiskFlatVer2BackingInfo:
			l.file, l.ds, l.delta = x.FileName, x.Datastore, x.DeltaDiskFormat
			l.kind = "flat"
			if x.Parent != nil {
				next = x.Parent
				switch x.DeltaDiskFormat {
				case string(types.VirtualDiskDeltaDiskFormatSeSparseFormat):
					l.kind = "seSparse"
				case string(types.VirtualDiskDeltaDiskFormatNativeFormat):
					l.kind = "native"
				default:
					l.kind = "vmfsSparse"
				}
			}
		case *types.VirtualDiskSeSparseBackingInfo:
			l.file, l.ds, l.kind = x.FileName, x.Datastore, "flat"
			if x.Parent != nil {
				next, l.kind = x.Parent, "seSparse"
			}
		case *types.VirtualDiskSparseVer2BackingInfo:
			l.file, l.ds, l.kind = x.FileName, x.Datastore, "sparse"
			if x.Parent != nil {
				next = x.Parent
			}
		case *types.VirtualDiskFlatVer1BackingInfo:
			l.file, l.ds, l.kind = x.FileName, x.Datastore, "flat"
			if x.Parent != nil {
				next, l.kind = x.Parent, "vmfsSparse"
			}
		case *types.VirtualDiskSparseVer1BackingInfo:
			l.file, l.ds, l.kind = x.FileName, x.Datastore, "sparse"
			if x.Parent != nil {
				next = x.Parent
			}
		case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
			l.file, l.ds, l.kind = x.FileName, x.Datastore, "rdm"
			if x.Parent != nil {
				next, l.kind = x.Parent, "vmfsSparse" // a virtual-mode RDM's snapshot delta
			}
		case types.BaseVirtualDeviceFileBackingInfo:
			fb := x.GetVirtualDeviceFileBackingInfo()
			l.file, l.ds, l.kind = fb.FileName, fb.Datastore, "unsupported"
		default:
			l.kind = "unsupported"
		}
		out = append(out, l)
		b = next
	}
	return out
}

// dataFiles is the conventional extent name of a layer's descriptor.
func dataFiles(file, kind string) []string {
	base := strings.TrimSuffix(file, ".vmdk")
	switch kind {
	case "flat":
		return []string{base + "-flat.vmdk"}
	case "vmfsSparse":
		return []string{base + "-delta.vmdk"}
	case "seSparse":
		return []string{base + "-sesparse.vmdk"}
	case "sparse":
		return []string{file}
	}
	return nil
}

// layoutExtents returns, per descriptor, the extent files vSphere lists in
// layoutEx (the authority on a real server).
func layoutExtents(l *types.VirtualMachineFileLayoutEx, layout []types.VirtualMachineFileLayoutExDiskLayout, key int32) map[string][]string {
	out := map[string][]string{}
	if l == nil {
		return out
	}
	files := map[int32]types.VirtualMachineFileLayoutExFileInfo{}
	for _, f := range l.File {
		files[f.Key] = f
	}
	for _, d := range layout {
		if d.Key != key {
			continue
		}
		for _, u := range d.Chain {
			var desc string
			var ext []string
			for _, k := range u.FileKey {
				f := files[k]
				switch f.Type {
				case string(types.VirtualMachineFileLayoutExFileTypeDiskDescriptor):
					desc = f.Name
				case string(types.VirtualMachineFileLayoutExFileTypeDiskExtent):
					ext = append(ext, f.Name)
				}
			}
			if desc != "" {
				out[desc] = ext
			}
		}
	}
	return out
}

func disks(devs object.VirtualDeviceList, ctls []Controller, extra map[string]string, vmCBT bool, names *namer, lx *types.VirtualMachineFileLayoutEx, layout []types.VirtualMachineFileLayoutExDiskLayout) []Disk {
	byKey := map[int32]Controller{}
	for _, c := range ctls {
		byKey[c.Key] = c
	}
	var out []Disk
	for _, d := range devs {
		vd, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		disk := Disk{Key: vd.Key, Label: label(vd.DeviceInfo), CapacityBytes: vd.CapacityInBytes, ControllerKey: vd.ControllerKey}
		if disk.CapacityBytes == 0 {
			disk.CapacityBytes = vd.CapacityInKB * 1024
		}
		if vd.UnitNumber != nil {
			disk.Unit = *vd.UnitNumber
		}
		ctl := byKey[vd.ControllerKey]
		disk.ControllerType = ctl.Type
		if ctl.Name != "" {
			disk.Address = fmt.Sprintf("%s:%d", ctl.Name, disk.Unit)
		}
		switch b := vd.Backing.(type) {
		case *types.VirtualDiskFlatVer2BackingInfo:
			disk.Mode, disk.UUID, disk.ChangeID = b.DiskMode, b.Uuid, b.ChangeId
			switch {
			case b.ThinProvisioned != nil && *b.ThinProvisioned:
				disk.Provisioning = "thin"
			case b.EagerlyScrub != nil && *b.EagerlyScrub:
				disk.Provisioning = "thick-eager"
			default:
				disk.Provisioning = "thick-lazy"
			}
		case *types.VirtualDiskSeSparseBackingInfo:
			disk.Mode, disk.UUID, disk.ChangeID, disk.Provisioning = b.DiskMode, b.Uuid, b.ChangeId, "thin"
		case *types.VirtualDiskSparseVer2BackingInfo:
			disk.Mode, disk.UUID, disk.ChangeID, disk.Provisioning = b.DiskMode, b.Uuid, b.ChangeId, "thin"
		case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
			disk.Mode, disk.UUID, disk.ChangeID = b.DiskMode, b.Uuid, b.ChangeId
			disk.Provisioning = "rdm-" + strings.TrimSuffix(b.CompatibilityMode, "Mode")
		}
		disk.Independent = strings.HasPrefix(disk.Mode, "independent")
		disk.CBT = vmCBT
		if v, ok := extra[disk.Address+".ctkEnabled"]; ok && disk.Address != "" {
			disk.CBT = strings.EqualFold(v, "true")
		}
		ext := layoutExtents(lx, layout, vd.Key)
		chain := backingChain(vd.Backing)
		for i, l := range chain {
			layer := Layer{File: l.file, Type: l.kind, DeltaFormat: l.delta, Backing: l.backing}
			if l.ds != nil {
				layer.Datastore = names.name(*l.ds)
			} else {
				var p object.DatastorePath
				if p.FromString(l.file) {
					layer.Datastore = p.Datastore
				}
			}
			if i+1 < len(chain) {
				layer.Parent = chain[i+1].file
			}
			layer.DataFiles = dataFiles(l.file, l.kind)
			if files := ext[l.file]; len(files) > 0 && agrees(files, l.kind) {
				layer.DataFiles = files
			}
			disk.Chain = append(disk.Chain, layer)
		}
		if len(disk.Chain) > 0 {
			disk.File, disk.Datastore = disk.Chain[0].File, disk.Chain[0].Datastore
		}
		out = append(out, disk)
	}
	return out
}

// agrees accepts layoutEx's extent list when it fits the layer's type (a
// split hosted disk lists several -s00N/-f00N files; a simulator may list a
// -flat file for a delta, which does not exist).
func agrees(listed []string, kind string) bool {
	for _, f := range listed {
		ok := false
		switch kind {
		case "flat":
			ok = strings.HasSuffix(f, "-flat.vmdk") || splitExtent.MatchString(f)
		case "vmfsSparse":
			ok = strings.HasSuffix(f, "-delta.vmdk")
		case "seSparse":
			ok = strings.HasSuffix(f, "-sesparse.vmdk")
		case "sparse":
			ok = true
		}
		if !ok {
			return false
		}
	}
	return true
}

var splitExtent = regexp.MustCompile(`-[fs]\d{3}\.vmdk$`)

func snapshotTree(list []types.VirtualMachineSnapshotTree, current string) []Snapshot {
	var out []Snapshot
	for _, s := range list {
		out = append(out, Snapshot{
			Name: s.Name, MoRef: s.Snapshot.Value, ID: s.Id, Description: s.Description,
			Created: s.CreateTime, PowerState: string(s.State), Quiesced: s.Quiesced,
			Current: s.Snapshot.Value == current, Children: snapshotTree(s.ChildSnapshotList, current),
		})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// FlattenSnapshots lists a snapshot tree depth first with each node's depth.
func FlattenSnapshots(tree []Snapshot) (out []Snapshot, depth []int) {
	var walk func([]Snapshot, int)
	walk = func(ss []Snapshot, d int) {
		for _, s := range ss {
			c := s
			c.Children = nil
			out, depth = append(out, c), append(depth, d)
			walk(s.Children, d+1)
		}
	}
	walk(tree, 0)
	return out, depth
}
