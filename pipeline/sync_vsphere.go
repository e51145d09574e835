package pipeline

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/cbt"
)

// MigrationSnapshot is the name of the snapshot a warm sync creates; a
// leftover one (from a killed run) is found by this name.
const MigrationSnapshot = "vmdk2kvm-warm-sync"

// VSphereSource is a VM on vCenter or ESXi with Changed Block Tracking.
type VSphereSource struct {
	Client *vim25.Client
	VM     types.ManagedObjectReference
	// Name describes the VM (its inventory path) in state and reports.
	Name string
	// DCPath is the datacenter's inventory path (dcPath of /folder URLs).
	DCPath string
	// OpenURL opens a datastore file URL (https://host/folder/...) as a
	// device: the HTTP transport plus the VMDK format, reading the chain in
	// place.
	OpenURL func(ctx context.Context, location string) (block.Device, error)
	// Resolve, when set, is the control plane's data-path resolution: the
	// /folder URL of each disk (by device key) at a snapshot (MoRef), or an
	// error for a disk that cannot be read over HTTPS (RDM, vSAN, ...).
	// Without it the URLs are built from the snapshot's disk backings.
	Resolve func(ctx context.Context, snapshot string) (map[int32]string, error)
	// EnableCBT turns change tracking on when it is off (it takes effect at
	// the stun of the round's snapshot), through EnableCBTFunc when set (the
	// control plane's, which also sets the per-disk ctkEnabled flags).
	EnableCBT     bool
	EnableCBTFunc func(ctx context.Context) error
	// Quiesce asks VMware Tools to quiesce the guest file systems for each
	// round's snapshot.
	Quiesce bool
	// SnapshotName overrides MigrationSnapshot (tests).
	SnapshotName string
	// Hashes selects the block-hash provider instead of CBT: no change
	// tracking needed, the frozen disk is read in full every round and only
	// differing blocks are written.
	Hashes bool
}

func (v *VSphereSource) snapName() string {
	if v.SnapshotName != "" {
		return v.SnapshotName
	}
	return MigrationSnapshot
}

func (v *VSphereSource) vm() *object.VirtualMachine { return object.NewVirtualMachine(v.Client, v.VM) }

// Describe implements WarmSource: the server (without the default port)
// and the VM's inventory path.
func (v *VSphereSource) Describe() string {
	u := v.Client.URL()
	host := u.Host
	if u.Port() == "443" {
		host = u.Hostname()
	}
	return "vsphere://" + host + v.Name
}

// Leftovers implements WarmSource.
func (v *VSphereSource) Leftovers(ctx context.Context) ([]string, error) {
	refs, err := v.leftovers(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, r := range refs {
		out = append(out, v.snapName()+" ("+r.Value+")")
	}
	return out, nil
}

func (v *VSphereSource) leftovers(ctx context.Context) ([]types.ManagedObjectReference, error) {
	var o mo.VirtualMachine
	if err := v.vm().Properties(ctx, v.VM, []string{"snapshot"}, &o); err != nil {
		return nil, fmt.Errorf("reading snapshots of %s: %w", v.Name, err)
	}
	var out []types.ManagedObjectReference
	if o.Snapshot == nil {
		return nil, nil
	}
	var walk func([]types.VirtualMachineSnapshotTree)
	walk = func(ts []types.VirtualMachineSnapshotTree) {
		for _, t := range ts {
			if t.Name == v.snapName() {
				out = append(out, t.Snapshot)
			}
			walk(t.ChildSnapshotList)
		}
	}
	walk(o.Snapshot.RootSnapshotList)
	return out, nil
}

// RemoveLeftovers implements WarmSource.
func (v *VSphereSource) RemoveLeftovers(ctx context.Context) error {
	refs, err := v.leftovers(ctx)
	if err != nil {
		return err
	}
	for _, r := range refs {
		if err := v.removeSnapshot(ctx, r); err != nil {
			return err
		}
	}
	return nil
}

func (v *VSphereSource) removeSnapshot(ctx context.Context, r types.ManagedObjectReference) error {
	consolidate := true
	res, err := methods.RemoveSnapshot_Task(ctx, v.Client, &types.RemoveSnapshot_Task{This: r, Consolidate: &consolidate})
	if err != nil {
		return fmt.Errorf("removing snapshot %s: %w", r.Value, err)
	}
	if err := object.NewTask(v.Client, res.Returnval).Wait(ctx); err != nil {
		return fmt.Errorf("removing snapshot %s: %w", r.Value, err)
	}
	return nil
}

// CBTEnabled reports the VM's changeTrackingEnabled.
func (v *VSphereSource) CBTEnabled(ctx context.Context) (bool, error) {
	var o mo.VirtualMachine
	if err := v.vm().Properties(ctx, v.VM, []string{"config.changeTrackingEnabled"}, &o); err != nil {
		return false, err
	}
	return o.Config != nil && o.Config.ChangeTrackingEnabled != nil && *o.Config.ChangeTrackingEnabled, nil
}

// Freeze implements WarmSource: check (or enable) CBT, create the snapshot,
// read each disk's change ID from the snapshot's disk backing.
func (v *VSphereSource) Freeze(ctx context.Context) (Frozen, error) {
	on, err := v.CBTEnabled(ctx)
	if err != nil {
		return nil, err
	}
	if !on && !v.Hashes {
		if !v.EnableCBT {
			return nil, fmt.Errorf("changed block tracking is off on %s: run with --enable-cbt (it takes effect at the next snapshot)", v.Name)
		}
		if v.EnableCBTFunc != nil {
			err = v.EnableCBTFunc(ctx)
		} else {
			yes := true
			var task *object.Task
			if task, err = v.vm().Reconfigure(ctx, types.VirtualMachineConfigSpec{ChangeTrackingEnabled: &yes}); err == nil {
				err = task.Wait(ctx)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("enabling changed block tracking on %s: %w", v.Name, err)
		}
	}
	task, err := v.vm().CreateSnapshot(ctx, v.snapName(), "vmdk2kvm warm migration: removed at the end of each sync round", false, v.Quiesce)
	if err != nil {
		return nil, fmt.Errorf("creating snapshot: %w", err)
	}
	res, err := task.WaitForResult(ctx)
	if err != nil {
		return nil, fmt.Errorf("creating snapshot: %w", err)
	}
	snap, ok := res.Result.(types.ManagedObjectReference)
	if !ok {
		return nil, errors.New("creating snapshot: the task returned no snapshot")
	}
	f := &vsphereFrozen{v: v, snap: snap}
	if err := f.describe(ctx); err != nil {
		// Do not leave the snapshot behind.
		_ = v.removeSnapshot(context.WithoutCancel(ctx), snap)
		return nil, err
	}
	return f, nil
}

type vsphereFrozen struct {
	v     *VSphereSource
	snap  types.ManagedObjectReference
	disks []FrozenDisk
}

func (f *vsphereFrozen) Disks() []FrozenDisk { return f.disks }

func (f *vsphereFrozen) Release(ctx context.Context) error { return f.v.removeSnapshot(ctx, f.snap) }

// describe reads the disks from the snapshot's own configuration: the
// backing file (the frozen chain) and the change ID as of the snapshot.
func (f *vsphereFrozen) describe(ctx context.Context) error {
	var s mo.VirtualMachineSnapshot
	if err := f.v.vm().Properties(ctx, f.snap, []string{"config.hardware"}, &s); err != nil {
		return fmt.Errorf("reading the snapshot's disks: %w", err)
	}
	var resolved map[int32]string
	if f.v.Resolve != nil {
		var err error
		if resolved, err = f.v.Resolve(ctx, f.snap.Value); err != nil {
			return fmt.Errorf("resolving the data path: %w", err)
		}
	}
	for _, dev := range s.Config.Hardware.Device {
		vd, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		file, changeID, mode := "", "", ""
		switch b := vd.Backing.(type) {
		case *types.VirtualDiskFlatVer2BackingInfo:
			file, changeID, mode = b.FileName, b.ChangeId, b.DiskMode
		case *types.VirtualDiskSparseVer2BackingInfo:
			file, changeID, mode = b.FileName, b.ChangeId, b.DiskMode
		case *types.VirtualDiskSeSparseBackingInfo:
			file, mode = b.FileName, b.DiskMode
		default:
			return fmt.Errorf("disk %d: backing %T is not supported by warm sync", vd.Key, vd.Backing)
		}
		if strings.HasPrefix(mode, "independent") {
			return fmt.Errorf("disk %d (%s) is independent: snapshots do not freeze it, so it cannot be synced warm", vd.Key, file)
		}
		label := "disk " + strconv.Itoa(int(vd.Key))
		if d := vd.DeviceInfo; d != nil && d.GetDescription().Label != "" {
			label = d.GetDescription().Label
		}
		loc, ok := resolved[vd.Key]
		if f.v.Resolve == nil {
			var err error
			if loc, err = f.v.folderURL(file); err != nil {
				return fmt.Errorf("disk %d: %w", vd.Key, err)
			}
		} else if !ok {
			return fmt.Errorf("disk %d (%s): the control plane resolved no data path for it", vd.Key, file)
		}
		key := vd.Key
		var prov cbt.Provider = &cbt.VSphere{Capacity: vd.CapacityInBytes, ChangeID: changeID,
			Query: cbt.SOAPQuery(f.v.Client, f.v.VM, f.snap, key)}
		if f.v.Hashes {
			prov = &cbt.Hash{} // bound to the source and replica by the Syncer
		}
		f.disks = append(f.disks, FrozenDisk{
			Key: strconv.Itoa(int(key)), Label: label, Capacity: vd.CapacityInBytes,
			Provider: prov,
			Open:     func(ctx context.Context) (block.Device, error) { return f.v.OpenURL(ctx, loc) },
		})
	}
	if len(f.disks) == 0 {
		return errors.New("the snapshot holds no disk")
	}
	return nil
}

// folderURL is the /folder URL of a datastore path "[ds] dir/file.vmdk".
func (v *VSphereSource) folderURL(dsPath string) (string, error) {
	var p object.DatastorePath
	if !p.FromString(dsPath) {
		return "", fmt.Errorf("bad datastore path %q", dsPath)
	}
	base := v.Client.URL()
	u := url.URL{Scheme: base.Scheme, Host: base.Host, Path: path.Join("/folder", p.Path)}
	q := url.Values{}
	q.Set("dcPath", strings.TrimPrefix(v.DCPath, "/"))
	q.Set("dsName", p.Datastore)
	u.RawQuery = q.Encode()
	return u.String(), nil
}

// PowerState returns the VM's power state.
func (v *VSphereSource) PowerState(ctx context.Context) (string, error) {
	var o mo.VirtualMachine
	if err := v.vm().Properties(ctx, v.VM, []string{"runtime.powerState"}, &o); err != nil {
		return "", err
	}
	return string(o.Runtime.PowerState), nil
}

// Shutdown stops the guest: through VMware Tools, waiting up to timeout for
// the power-off, and powering off when force is set (and the guest did not
// stop, or Tools is not running).
func (v *VSphereSource) Shutdown(ctx context.Context, timeout time.Duration, force bool) (string, error) {
	state, err := v.PowerState(ctx)
	if err != nil {
		return "", err
	}
	if state == string(types.VirtualMachinePowerStatePoweredOff) {
		return "already powered off", nil
	}
	how := "guest shutdown through VMware Tools"
	if err := v.vm().ShutdownGuest(ctx); err != nil {
		if !force {
			return "", fmt.Errorf("guest shutdown of %s failed (%v): use --force to power it off", v.Name, err)
		}
	} else if ok, err := v.waitOff(ctx, timeout); err != nil {
		return "", err
	} else if ok {
		return how, nil
	} else if !force {
		return "", fmt.Errorf("%s did not power off within %s: use --force to power it off", v.Name, timeout)
	}
	task, err := v.vm().PowerOff(ctx)
	if err == nil {
		err = task.Wait(ctx)
	}
	if err != nil {
		return "", fmt.Errorf("powering off %s: %w", v.Name, err)
	}
	return "forced power-off", nil
}

func (v *VSphereSource) waitOff(ctx context.Context, timeout time.Duration) (bool, error) {
	deadline := time.Now().Add(timeout)
	for {
		s, err := v.PowerState(ctx)
		if err != nil {
			return false, err
		}
		if s == string(types.VirtualMachinePowerStatePoweredOff) {
			return true, nil
		}
		if time.Now().After(deadline) {
			return false, nil
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Hardware is what the domain XML needs from the VM.
type Hardware struct {
	Name      string
	CPUs      int32
	MemoryMiB int64
	Firmware  string // bios or efi
	MACs      []string
}

// Hardware reads the VM's configuration.
func (v *VSphereSource) Hardware(ctx context.Context) (Hardware, error) {
	var o mo.VirtualMachine
	if err := v.vm().Properties(ctx, v.VM, []string{"name", "config"}, &o); err != nil {
		return Hardware{}, err
	}
	h := Hardware{Name: o.Name}
	if c := o.Config; c != nil {
		h.CPUs, h.MemoryMiB, h.Firmware = c.Hardware.NumCPU, int64(c.Hardware.MemoryMB), c.Firmware
		for _, d := range c.Hardware.Device {
			if n, ok := d.(types.BaseVirtualEthernetCard); ok {
				h.MACs = append(h.MACs, n.GetVirtualEthernetCard().MacAddress)
			}
		}
	}
	return h, nil
}
