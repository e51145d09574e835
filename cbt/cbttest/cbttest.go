// Package cbttest extends govmomi's vSphere simulator with Changed Block
// Tracking for warm-migration tests, on top of vmware/vmwaretest.
//
// The simulator has no QueryChangedDiskAreas and no change IDs. CBTVM wraps
// its VirtualMachine object (the type embeds *simulator.VirtualMachine and is
// routed to through vmwaretest.Env.Wrap, so every other method, snapshots
// included, stays the simulator's own):
//
//   - CreateSnapshot_Task: when change tracking is enabled on the VM, each
//     snapshot's disk backing carries a change ID "EPOCH/N" (N counts the
//     snapshots); after the snapshot the VM's running disk moves on to another
//     change ID, so a caller that reads the VM's backing instead of the
//     snapshot's loses writes;
//   - QueryChangedDiskAreas answers from the changes the harness itself wrote
//     into the real -flat.vmdk file (Harness.Write, Harness.Discard), "*" from
//     the file's real allocation, in pages of at most PageAreas areas and at
//     most PageBytes of disk, so that pages in the middle of the disk are
//     empty and callers must continue from startOffset+length;
//   - Harness.ResetCBT starts a new epoch (what disabling and enabling CBT or
//     a storage vMotion does): old change IDs are refused with a FileFault.
//
// A CountingProxy in front of the simulator counts the bytes served from the
// datastore (/folder) so tests can assert that an incremental round reads
// the changed bytes, not the disk.
package cbttest

import (
	"context"
	"crypto/rand"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
	"github.com/vmdk2kvm/vmdk2kvm/vmware/vmwaretest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/vmdk2kvm/vmdk2kvm/cbt"
)

// change is one write the harness made, tagged with the number of snapshots
// taken before it.
type change struct {
	gen int
	ext block.Extent
}

// tracked is the CBT bookkeeping of one disk.
type tracked struct {
	key      int32
	flat     string // local -flat.vmdk path
	desc     string // local descriptor path
	capacity int64
	epoch    string // "" = tracking not active yet
	gen      int    // snapshots taken in this epoch
	log      []change
}

// CBTVM is a simulator VM with change tracking.
type CBTVM struct {
	*simulator.VirtualMachine

	mu    sync.Mutex
	disks map[int32]*tracked
	// PageAreas caps the areas of one QueryChangedDiskAreas answer.
	PageAreas int
	// PageBytes caps how much of the disk one answer covers.
	PageBytes int64
	// Queries counts QueryChangedDiskAreas calls (for assertions).
	Queries int
}

func (vm *CBTVM) disk(key int32) *tracked { return vm.disks[key] }

// CreateSnapshotTask gives the snapshot's disk backings their change IDs.
func (vm *CBTVM) CreateSnapshotTask(ctx *simulator.Context, req *types.CreateSnapshot_Task) soap.HasFault {
	vm.mu.Lock()
	enabled := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	ids := map[int32]string{}
	for _, d := range vm.disks {
		if !enabled {
			d.epoch = ""
			continue
		}
		if d.epoch == "" { // the stun activates tracking
			d.epoch, d.gen, d.log = newEpoch(), 0, nil
		}
		d.gen++
		ids[d.key] = fmt.Sprintf("%s/%d", d.epoch, d.gen)
	}
	vm.setChangeIDs(ids) // the snapshot copies the VM's config
	vm.mu.Unlock()

	res := vm.VirtualMachine.CreateSnapshotTask(ctx, req)
	body, ok := res.(*methods.CreateSnapshot_TaskBody)
	if !ok || body.Res == nil {
		return res
	}
	taskRef := body.Res.Returnval
	gens := map[int32]int{}
	for _, d := range vm.disks {
		gens[d.key] = d.gen
	}
	go func() {
		// When the task is done, the running disk moves on to a later
		// change ID than the snapshot's (unless another snapshot came).
		t, ok := ctx.Map.Get(taskRef).(*simulator.Task)
		if !ok {
			return
		}
		t.Wait()
		ctx.Map.WithLock(&simulator.Context{}, vm.Self, func() {
			vm.mu.Lock()
			defer vm.mu.Unlock()
			live := map[int32]string{}
			for _, d := range vm.disks {
				if d.epoch == "" || d.gen != gens[d.key] {
					return
				}
				live[d.key] = fmt.Sprintf("%s/%d", d.epoch, d.gen+1000000)
			}
			vm.setChangeIDs(live)
		})
	}()
	return res
}

// setChangeIDs sets the VM's disk backings' change IDs (caller holds mu).
func (vm *CBTVM) setChangeIDs(ids map[int32]string) {
	for _, dev := range vm.Config.Hardware.Device {
		vd, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		if b, ok := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
			b.ChangeId = ids[vd.Key]
		}
	}
}

// QueryChangedDiskAreas answers from the harness's own log of writes.
func (vm *CBTVM) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	vm.Queries++
	body := &methods.QueryChangedDiskAreasBody{}
	fail := func(msg string, f types.BaseMethodFault) soap.HasFault {
		body.Fault_ = simulator.Fault(msg, f)
		return body
	}
	d := vm.disk(req.DeviceKey)
	if d == nil {
		return fail(fmt.Sprintf("no disk with key %d", req.DeviceKey), &types.InvalidArgument{InvalidProperty: "deviceKey"})
	}
	if req.Snapshot == nil {
		return fail("this harness models queries against a snapshot only", &types.InvalidArgument{InvalidProperty: "snapshot"})
	}
	if d.epoch == "" {
		return fail("change tracking is not active on this disk", &types.FileFault{File: d.flat})
	}
	// The snapshot's own disk backing says which generation it froze.
	snapGen, snapEpoch := -1, ""
	if so, ok := ctx.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot); ok {
		for _, dev := range so.Config.Hardware.Device {
			if vd, ok := dev.(*types.VirtualDisk); ok && vd.Key == d.key {
				if b, ok := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
					if i := strings.LastIndexByte(b.ChangeId, '/'); i > 0 {
						snapEpoch = b.ChangeId[:i]
						snapGen, _ = strconv.Atoi(b.ChangeId[i+1:])
					}
				}
			}
		}
	}
	if snapGen < 0 || snapEpoch != d.epoch {
		return fail(fmt.Sprintf("snapshot %s has no valid change tracking for this disk", req.Snapshot.Value), &types.FileFault{File: d.flat})
	}
	if req.StartOffset < 0 || req.StartOffset >= d.capacity {
		return fail(fmt.Sprintf("startOffset %d outside the disk (%d bytes)", req.StartOffset, d.capacity), &types.InvalidArgument{InvalidProperty: "startOffset"})
	}
	var areas []block.Extent
	if req.ChangeId == "*" {
		var err error
		if areas, err = dataAreas(d.flat, d.capacity); err != nil {
			return fail(err.Error(), &types.FileFault{File: d.flat})
		}
	} else {
		i := strings.LastIndexByte(req.ChangeId, '/')
		since, err := strconv.Atoi(req.ChangeId[i+1:])
		if i < 0 || err != nil || req.ChangeId[:i] != d.epoch || since > snapGen {
			// What vSphere says for a change ID from another epoch.
			return fail(fmt.Sprintf("Error caused by file %s (change ID %q is not valid for this disk)", d.flat, req.ChangeId), &types.FileFault{File: d.flat})
		}
		for _, c := range d.log {
			if c.gen >= since && c.gen < snapGen {
				areas = append(areas, c.ext)
			}
		}
		areas = cbt.Normalize(areas, d.capacity)
	}
	// One page: at most PageBytes of disk, at most PageAreas areas.
	end := d.capacity
	if vm.PageBytes > 0 {
		end = min(end, req.StartOffset+vm.PageBytes)
	}
	info := types.DiskChangeInfo{StartOffset: req.StartOffset, Length: end - req.StartOffset}
	var out []types.DiskChangeExtent
	for _, a := range block.Clip(areas, req.StartOffset, end-req.StartOffset) {
		if vm.PageAreas > 0 && len(out) == vm.PageAreas {
			last := out[len(out)-1]
			info.Length = last.Start + last.Length - req.StartOffset
			break
		}
		out = append(out, types.DiskChangeExtent{Start: a.Off, Length: a.Len})
	}
	info.ChangedArea = out
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: info}
	return body
}

func newEpoch() string {
	var b [16]byte
	rand.Read(b[:])
	s := make([]string, 0, 16)
	for _, x := range b {
		s = append(s, fmt.Sprintf("%02x", x))
	}
	return strings.Join(s[:8], " ") + "-" + strings.Join(s[8:], " ")
}

// dataAreas lists the data extents of a sparse file up to size.
func dataAreas(name string, size int64) ([]block.Extent, error) {
	f, err := file.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	exts, err := f.Extents(context.Background(), 0, size)
	if err != nil {
		return nil, err
	}
	out := exts[:0]
	for _, e := range exts {
		if e.Type == block.Data {
			out = append(out, e)
		}
	}
	return out, nil
}

// writeDescriptor writes a VMFS (flat) descriptor for a -flat.vmdk.
func writeDescriptor(path, flat string, size int64) error {
	return os.WriteFile(path, []byte(vmwaretest.FlatDescriptor(flat, size, 0x2a000001)), 0o644)
}

// flatOf returns the local paths of a disk backing's descriptor and flat file.
func flatOf(dsDir, fileName string) (desc, flat string) {
	var p object.DatastorePath
	p.FromString(fileName)
	desc = filepath.Join(dsDir, filepath.FromSlash(p.Path))
	return desc, strings.TrimSuffix(desc, ".vmdk") + "-flat.vmdk"
}
