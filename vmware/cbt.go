package vmware

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/types"
)

// ErrCBTUnavailable says CBT cannot be enabled on this VM as it is.
var ErrCBTUnavailable = errors.New("CBT cannot be enabled")

// CBTResult reports what EnableCBT did.
type CBTResult struct {
	WasEnabled bool     `json:"was_enabled"` // already on before
	Disks      []string `json:"disks"`       // addresses whose ctkEnabled was set
	Skipped    []string `json:"skipped,omitempty"`
	Stunned    bool     `json:"stunned"` // a snapshot was created and removed
	// Effective says whether CBT is active now (true after a stun, or for a
	// powered-off VM at its next power-on).
	Effective string `json:"effective"`
}

// StunSnapshotName is the name of the snapshot EnableCBT creates and
// removes to make CBT take effect on a running VM.
const StunSnapshotName = "vmdk2kvm-cbt-stun"

// EnableCBT turns on changeTrackingEnabled and the per-disk ctkEnabled flags.
// CBT takes effect at the next stun: with stun true and the VM powered on, a
// snapshot is created and removed at once. It refuses VMs with snapshots (the
// per-disk tracking files would not follow existing deltas) and hardware that
// cannot track changes (before vmx-07).
func (c *Client) EnableCBT(ctx context.Context, vm *VM, stun bool) (*CBTResult, error) {
	info, err := c.Info(ctx, vm)
	if err != nil {
		return nil, err
	}
	if v := hwVersion(info.HardwareVersion); (v > 0 && v < 7) || !info.CBTSupported {
		return nil, fmt.Errorf("%w on %s: vSphere reports it cannot track changes (hardware version %s; CBT needs vmx-07 or later and disks vSphere can track)", ErrCBTUnavailable, vm.Name, info.HardwareVersion)
	}
	if n := countSnapshots(info.Snapshots); n > 0 {
		return nil, fmt.Errorf("%w on %s: it has %d snapshot(s); remove them first (vmdk2kvm vsphere snapshot remove)", ErrCBTUnavailable, vm.Name, n)
	}
	res := &CBTResult{WasEnabled: info.CBT}
	var extra []types.BaseOptionValue
	for _, d := range info.Disks {
		switch {
		case d.Address == "":
			res.Skipped = append(res.Skipped, d.Label+" (no controller address)")
		case d.Independent:
			res.Skipped = append(res.Skipped, d.Address+" (independent disk: never in snapshots)")
		case strings.HasPrefix(d.Provisioning, "rdm-physical"):
			res.Skipped = append(res.Skipped, d.Address+" (physical-mode RDM)")
		default:
			extra = append(extra, &types.OptionValue{Key: d.Address + ".ctkEnabled", Value: "TRUE"})
			res.Disks = append(res.Disks, d.Address)
		}
	}
	on := true
	spec := types.VirtualMachineConfigSpec{ChangeTrackingEnabled: &on, ExtraConfig: extra}
	task, err := c.Object(vm).Reconfigure(ctx, spec)
	if err != nil {
		return nil, fmt.Errorf("enable CBT on %s: %w", vm.Name, err)
	}
	if err := task.Wait(ctx); err != nil {
		return nil, fmt.Errorf("enable CBT on %s: %w", vm.Name, err)
	}
	switch {
	case info.PowerState != string(types.VirtualMachinePowerStatePoweredOn):
		res.Effective = "at the next power-on"
	case !stun:
		res.Effective = "at the next stun (snapshot create/remove, vMotion or power cycle)"
	default:
		ref, err := c.CreateSnapshot(ctx, vm, StunSnapshotName, SnapshotOptions{Description: "vmdk2kvm: makes CBT take effect; removed at once"})
		if err != nil {
			return res, fmt.Errorf("CBT is configured on %s but the stun failed: %w", vm.Name, err)
		}
		if err := c.RemoveSnapshot(ctx, vm, ref, false, true); err != nil {
			return res, fmt.Errorf("CBT is on for %s but its stun snapshot %s could not be removed: %w", vm.Name, ref, err)
		}
		res.Stunned, res.Effective = true, "now"
	}
	return res, nil
}

func countSnapshots(tree []Snapshot) int {
	flat, _ := FlattenSnapshots(tree)
	return len(flat)
}

func hwVersion(v string) int {
	n, _ := strconv.Atoi(strings.TrimPrefix(v, "vmx-"))
	return n
}

// ChangedAreas pages QueryChangedDiskAreas over a whole disk: from offset 0,
// again from startOffset+length, until the capacity (an empty page is not
// the end). changeID "*" returns the allocated areas. snapshot is the
// snapshot MoRef the query runs against ("" for none, allowed only on a
// powered-off VM).
func (c *Client) ChangedAreas(ctx context.Context, vm *VM, snapshot string, diskKey int32, capacity int64, changeID string) ([]types.DiskChangeExtent, error) {
	req := types.QueryChangedDiskAreas{This: vm.Ref, DeviceKey: diskKey, ChangeId: changeID}
	if snapshot != "" {
		req.Snapshot = &types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: snapshot}
	}
	var out []types.DiskChangeExtent
	for off := int64(0); off < capacity; {
		req.StartOffset = off
		res, err := methods.QueryChangedDiskAreas(ctx, c.vim, &req)
		if err != nil {
			return nil, fmt.Errorf("changed areas of disk %d of %s from %d: %w", diskKey, vm.Name, off, err)
		}
		info := res.Returnval
		if info.Length <= 0 || info.StartOffset != off {
			return nil, fmt.Errorf("changed areas of disk %d of %s: the server answered start %d length %d for a query at %d", diskKey, vm.Name, info.StartOffset, info.Length, off)
		}
		for _, a := range info.ChangedArea {
			if a.Start < off || a.Length < 0 || a.Start+a.Length > info.StartOffset+info.Length {
				return nil, fmt.Errorf("changed areas of disk %d of %s: area %d+%d lies outside the page %d+%d", diskKey, vm.Name, a.Start, a.Length, info.StartOffset, info.Length)
			}
			out = append(out, a)
		}
		off = info.StartOffset + info.Length
	}
	return out, nil
}

// AllocatedBytes sums the areas QueryChangedDiskAreas("*") reports.
func (c *Client) AllocatedBytes(ctx context.Context, vm *VM, snapshot string, d Disk) (int64, error) {
	areas, err := c.ChangedAreas(ctx, vm, snapshot, d.Key, d.CapacityBytes, "*")
	if err != nil {
		return 0, err
	}
	var n int64
	for _, a := range areas {
		n += a.Length
	}
	return n, nil
}
