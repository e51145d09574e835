package vmwaretest

import (
	"context"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
	"os"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// AllocatedAreasVM adds QueryChangedDiskAreas to a simulator VM for the
// change ID "*" only: the answer is the real allocation (SEEK_DATA /
// SEEK_HOLE) of the disk's -flat.vmdk file in the datastore folder, in pages
// of at most PageAreas areas, as vSphere pages its answers. Any other change
// ID is refused with InvalidArgument; the warm-migration harness replaces
// this type with one that tracks writes.
type AllocatedAreasVM struct {
	*simulator.VirtualMachine
	Env *Env
	// PageAreas bounds the areas of one answer (default 1, so callers must page).
	PageAreas int
}

// QueryChangedDiskAreas answers with the simulator's SOAP signature.
func (vm *AllocatedAreasVM) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	fault := func(msg string) soap.HasFault {
		body.Fault_ = simulator.Fault(msg, &types.InvalidArgument{InvalidProperty: "changeId"})
		return body
	}
	if req.ChangeId != "*" {
		return fault("vmwaretest: only changeId \"*\" is modelled")
	}
	var disk *types.VirtualDisk
	for _, d := range vm.Config.Hardware.Device {
		if vd, ok := d.(*types.VirtualDisk); ok && vd.Key == req.DeviceKey {
			disk = vd
		}
	}
	if disk == nil {
		return fault(fmt.Sprintf("vmwaretest: no disk with key %d", req.DeviceKey))
	}
	b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	if !ok {
		return fault("vmwaretest: only flat disks are modelled")
	}
	var p object.DatastorePath
	p.FromString(b.FileName)
	flat := vm.Env.Path(strings.TrimSuffix(p.Path, ".vmdk") + "-flat.vmdk")
	areas, err := dataAreas(flat, req.StartOffset, disk.CapacityInBytes)
	if err != nil {
		return fault(err.Error())
	}
	n := vm.PageAreas
	if n <= 0 {
		n = 1
	}
	info := types.DiskChangeInfo{StartOffset: req.StartOffset, Length: disk.CapacityInBytes - req.StartOffset}
	if len(areas) > n {
		areas = areas[:n]
		last := areas[n-1]
		info.Length = last.Start + last.Length - req.StartOffset
	}
	info.ChangedArea = areas
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: info}
	return body
}

// dataAreas lists the data extents of a file from off to size.
func dataAreas(name string, off, size int64) ([]types.DiskChangeExtent, error) {
	f, err := file.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	exts, err := f.Extents(context.Background(), off, size-off)
	if err != nil {
		return nil, err
	}
	var out []types.DiskChangeExtent
	for _, e := range exts {
		if e.Type == block.Data {
			out = append(out, types.DiskChangeExtent{Start: e.Off, Length: e.Len})
		}
	}
	return out, nil
}

// AllocatedBytes sums the data areas of a file in the datastore folder (for
// assertions).
func (e *Env) AllocatedBytes(rel string) (int64, error) {
	fi, err := os.Stat(e.Path(rel))
	if err != nil {
		return 0, err
	}
	areas, err := dataAreas(e.Path(rel), 0, fi.Size())
	if err != nil {
		return 0, err
	}
	var n int64
	for _, a := range areas {
		n += a.Length
	}
	return n, nil
}
