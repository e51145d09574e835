package cbttest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
	"golang.org/x/sys/unix"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/internal/diskgen"
	"github.com/vmdk2kvm/vmdk2kvm/vmware/vmwaretest"
)

// DiskKey is the device key of the harness VM's disk; SecondDiskKey that of
// the optional second disk.
const (
	DiskKey       = 2000
	SecondDiskKey = 2001
)

// Harness is a simulated vCenter with one VM whose single disk is a real
// generated test disk, with change tracking and a byte-counting proxy.
type Harness struct {
	Env   *vmwaretest.Env
	Name  string
	VM    types.ManagedObjectReference
	CBT   *CBTVM
	Proxy *CountingProxy
	Desc  string // local path of the disk descriptor
	Flat  string // local path of the -flat.vmdk
	// Flat2 is the second disk's -flat.vmdk (Options.SecondDisk).
	Flat2 string
}

// Options shape the harness VM.
type Options struct {
	Name string // VM name (default "warm01")
	Size int64  // disk size (default 64 MiB)
	Seed uint64 // diskgen seed (default 1)
	// From, when set, is a raw disk copied (sparsely) as the VM's disk
	// instead of generating one; Size is then its size.
	From      string
	CBT       bool  // change tracking enabled on the VM
	PageAreas int   // default 3
	PageBytes int64 // default Size/8
	PoweredOn bool
	// SecondDisk, when positive, adds a second generated disk of that size
	// (key SecondDiskKey, scsi0:1).
	SecondDisk int64
}

// New starts vmwaretest's simulator and adds the harness VM to it.
func New(t testing.TB, o Options) *Harness {
	t.Helper()
	env := vmwaretest.New(t)
	h, err := Add(context.Background(), env, o)
	if err != nil {
		t.Fatalf("cbttest: %v", err)
	}
	t.Cleanup(h.Close)
	return h
}

// Add creates the harness VM in a running environment and starts the proxy.
func Add(ctx context.Context, env *vmwaretest.Env, o Options) (*Harness, error) {
	if o.Name == "" {
		o.Name = "warm01"
	}
	if o.Size == 0 && o.From == "" {
		o.Size = 64 << 20
	}
	if o.Seed == 0 {
		o.Seed = 1
	}
	if o.PageAreas == 0 {
		o.PageAreas = 3
	}
	h := &Harness{Env: env, Name: o.Name}
	rel := o.Name + "/" + o.Name + ".vmdk"
	h.Desc, h.Flat = flatOf(env.Dir, "[vmstore] "+rel)
	if err := os.MkdirAll(filepath.Dir(h.Desc), 0o755); err != nil {
		return nil, err
	}
	if o.From != "" {
		st, err := os.Stat(o.From)
		if err != nil {
			return nil, err
		}
		o.Size = st.Size()
		if out, err := exec.CommandContext(ctx, "cp", "--sparse=always", "--reflink=auto", o.From, h.Flat).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("copying %s: %v: %s", o.From, err, out)
		}
	} else if _, err := diskgen.Write(ctx, h.Flat, o.Size, o.Seed); err != nil {
		return nil, err
	}
	if err := writeDescriptor(h.Desc, filepath.Base(h.Flat), o.Size); err != nil {
		return nil, err
	}

	var desc2 string
	rel2 := o.Name + "/" + o.Name + "_1.vmdk"
	if o.SecondDisk > 0 {
		desc2, h.Flat2 = flatOf(env.Dir, "[vmstore] "+rel2)
		if _, err := diskgen.Write(ctx, h.Flat2, o.SecondDisk, o.Seed+1); err != nil {
			return nil, err
		}
		if err := writeDescriptor(desc2, filepath.Base(h.Flat2), o.SecondDisk); err != nil {
			return nil, err
		}
	}

	c := env.Client.Client
	finder := find.NewFinder(c, false)
	dc, err := finder.Datacenter(ctx, vmwaretest.Datacenter)
	if err != nil {
		return nil, err
	}
	finder.SetDatacenter(dc)
	host, err := finder.HostSystem(ctx, vmwaretest.Host)
	if err != nil {
		return nil, err
	}
	pool, err := host.ResourcePool(ctx)
	if err != nil {
		return nil, err
	}
	folders, err := dc.Folders(ctx)
	if err != nil {
		return nil, err
	}
	unit := int32(0)
	thin := true
	spec := types.VirtualMachineConfigSpec{
		Name: o.Name, GuestId: "debian11_64Guest", NumCPUs: 1, MemoryMB: 1024, Version: "vmx-19",
		Firmware:              string(types.GuestOsDescriptorFirmwareTypeBios),
		Files:                 &types.VirtualMachineFileInfo{VmPathName: "[vmstore] " + o.Name + "/" + o.Name + ".vmx"},
		ChangeTrackingEnabled: &o.CBT,
		DeviceChange: []types.BaseVirtualDeviceConfigSpec{
			&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: &types.ParaVirtualSCSIController{
				VirtualSCSIController: types.VirtualSCSIController{SharedBus: types.VirtualSCSISharingNoSharing,
					VirtualController: types.VirtualController{BusNumber: 0, VirtualDevice: types.VirtualDevice{Key: 1000}}}}},
			&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: &types.VirtualDisk{
				VirtualDevice: types.VirtualDevice{Key: DiskKey, ControllerKey: 1000, UnitNumber: &unit,
					Backing: &types.VirtualDiskFlatVer2BackingInfo{
						VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: "[vmstore] " + rel},
						DiskMode:                     string(types.VirtualDiskModePersistent), ThinProvisioned: &thin,
					}},
				CapacityInBytes: o.Size, CapacityInKB: o.Size / 1024,
			}},
		},
	}
	if o.SecondDisk > 0 {
		unit1 := int32(1)
		spec.DeviceChange = append(spec.DeviceChange, &types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{Key: SecondDiskKey, ControllerKey: 1000, UnitNumber: &unit1,
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: "[vmstore] " + rel2},
					DiskMode:                     string(types.VirtualDiskModePersistent), ThinProvisioned: &thin,
				}},
			CapacityInBytes: o.SecondDisk, CapacityInKB: o.SecondDisk / 1024,
		}})
	}
	task, err := folders.VmFolder.CreateVM(ctx, spec, pool, host)
	if err != nil {
		return nil, err
	}
	res, err := task.WaitForResult(ctx)
	if err != nil {
		return nil, fmt.Errorf("create VM %s: %w", o.Name, err)
	}
	h.VM = res.Result.(types.ManagedObjectReference)
	if o.PoweredOn {
		t, err := object.NewVirtualMachine(c, h.VM).PowerOn(ctx)
		if err != nil {
			return nil, err
		}
		if err := t.Wait(ctx); err != nil {
			return nil, err
		}
	}
	if o.PageBytes == 0 {
		o.PageBytes = max(o.Size/8, 1<<20)
	}
	h.CBT = &CBTVM{VirtualMachine: env.SimVM(h.VM), disks: map[int32]*tracked{
		DiskKey: {key: DiskKey, flat: h.Flat, desc: h.Desc, capacity: o.Size},
	}, PageAreas: o.PageAreas, PageBytes: o.PageBytes}
	if o.SecondDisk > 0 {
		h.CBT.disks[SecondDiskKey] = &tracked{key: SecondDiskKey, flat: h.Flat2, desc: desc2, capacity: o.SecondDisk}
	}
	env.Wrap(h.VM, h.CBT)
	h.Proxy, err = NewCountingProxy(env.URL)
	if err != nil {
		return nil, err
	}
	return h, nil
}

// Close stops the proxy (the environment has its own cleanup).
func (h *Harness) Close() {
	if h.Proxy != nil {
		h.Proxy.Close()
	}
}

// Write writes p at off into the disk, as the running guest would, and logs
// the change for QueryChangedDiskAreas.
func (h *Harness) Write(off int64, p []byte) error { return h.WriteDisk(DiskKey, off, p) }

// WriteDisk is Write on the disk with the given key.
func (h *Harness) WriteDisk(key int32, off int64, p []byte) error {
	h.CBT.mu.Lock()
	d := h.CBT.disk(key)
	h.CBT.mu.Unlock()
	if d == nil {
		return fmt.Errorf("no disk with key %d", key)
	}
	f, err := os.OpenFile(d.flat, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		return err
	}
	h.logChange(key, block.Extent{Off: off, Len: int64(len(p)), Type: block.Data})
	return f.Close()
}

// Discard deallocates a range (the guest trims it): it reads as zeros and
// counts as changed.
func (h *Harness) Discard(off, length int64) error {
	f, err := os.OpenFile(h.Flat, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length); err != nil {
		return fmt.Errorf("punch hole: %w", err)
	}
	h.logChange(DiskKey, block.Extent{Off: off, Len: length, Type: block.Data})
	return nil
}

func (h *Harness) logChange(key int32, e block.Extent) {
	h.CBT.mu.Lock()
	defer h.CBT.mu.Unlock()
	d := h.CBT.disk(key)
	d.log = append(d.log, change{gen: d.gen, ext: e})
}

// WriteRandomRuns writes n runs of random data (lengths in [minLen, maxLen],
// 4 KiB aligned) at random places, and returns the bytes it wrote.
func (h *Harness) WriteRandomRuns(seed uint64, n int, minLen, maxLen int64) (int64, error) {
	r := rand.New(rand.NewPCG(seed, 99))
	size := h.Size()
	var total int64
	for range n {
		l := (minLen + r.Int64N(maxLen-minLen+1)) &^ 4095
		off := r.Int64N(size-l) &^ 4095
		p := make([]byte, l)
		for i := range p {
			p[i] = byte(r.Uint32())
		}
		if err := h.Write(off, p); err != nil {
			return total, err
		}
		total += l
	}
	return total, nil
}

// Size returns the disk's capacity.
func (h *Harness) Size() int64 {
	h.CBT.mu.Lock()
	defer h.CBT.mu.Unlock()
	return h.CBT.disk(DiskKey).capacity
}

// ResetCBT starts a new change-tracking epoch on the disk: every earlier
// change ID becomes invalid (what disabling and re-enabling CBT does).
func (h *Harness) ResetCBT() {
	h.CBT.mu.Lock()
	defer h.CBT.mu.Unlock()
	d := h.CBT.disk(DiskKey)
	d.epoch, d.gen, d.log = newEpoch(), 0, nil
}

// Grow extends the disk to size bytes: the flat file, the descriptor and the
// capacity of the VM's device. The simulator's own ReconfigVM would recreate
// the disk file, so the device is updated in place, as vSphere shows a disk
// grown by "extend".
func (h *Harness) Grow(ctx context.Context, size int64) error {
	if err := os.Truncate(h.Flat, size); err != nil {
		return err
	}
	if err := writeDescriptor(h.Desc, filepath.Base(h.Flat), size); err != nil {
		return err
	}
	found := false
	h.Env.Model.Map().WithLock(&simulator.Context{}, h.VM, func() {
		h.CBT.mu.Lock()
		defer h.CBT.mu.Unlock()
		h.CBT.disk(DiskKey).capacity = size
		for _, dev := range h.CBT.Config.Hardware.Device {
			if vd, ok := dev.(*types.VirtualDisk); ok && vd.Key == DiskKey {
				vd.CapacityInBytes, vd.CapacityInKB = size, size/1024
				found = true
			}
		}
	})
	if !found {
		return fmt.Errorf("disk %d not found", DiskKey)
	}
	return nil
}

// Snapshots lists the names of the VM's snapshots (for assertions).
func (h *Harness) Snapshots(ctx context.Context) ([]string, error) {
	vm := object.NewVirtualMachine(h.Env.Client.Client, h.VM)
	var names []string
	tree, err := vmSnapshotTree(ctx, vm)
	if err != nil {
		return nil, err
	}
	var walk func([]types.VirtualMachineSnapshotTree)
	walk = func(ts []types.VirtualMachineSnapshotTree) {
		for _, t := range ts {
			names = append(names, t.Name)
			walk(t.ChildSnapshotList)
		}
	}
	walk(tree)
	return names, nil
}
