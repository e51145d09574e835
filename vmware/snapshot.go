package vmware

import (
	"context"
	"fmt"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// SnapshotOptions tunes CreateSnapshot. Memory is off unless asked: a
// migration needs crash-consistent or quiesced disks, not RAM.
type SnapshotOptions struct {
	Description string
	Quiesce     bool
	Memory      bool
}

// CreateSnapshot takes a snapshot and returns its MoRef.
func (c *Client) CreateSnapshot(ctx context.Context, vm *VM, name string, o SnapshotOptions) (string, error) {
	if name == "" {
		return "", fmt.Errorf("snapshot of %s: a name is needed", vm.Name)
	}
	task, err := c.Object(vm).CreateSnapshot(ctx, name, o.Description, o.Memory, o.Quiesce)
	if err != nil {
		return "", fmt.Errorf("snapshot %q of %s: %w", name, vm.Name, err)
	}
	res, err := task.WaitForResult(ctx)
	if err != nil {
		return "", fmt.Errorf("snapshot %q of %s: %w", name, vm.Name, err)
	}
	ref, ok := res.Result.(types.ManagedObjectReference)
	if !ok {
		return "", fmt.Errorf("snapshot %q of %s: the task returned %T, not a snapshot", name, vm.Name, res.Result)
	}
	return ref.Value, nil
}

// Snapshots returns a VM's snapshot tree and the current snapshot's MoRef.
func (c *Client) Snapshots(ctx context.Context, vm *VM) ([]Snapshot, string, error) {
	var m mo.VirtualMachine
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, vm.Ref, []string{"snapshot"}, &m); err != nil {
		return nil, "", fmt.Errorf("snapshots of %s: %w", vm.Name, err)
	}
	if m.Snapshot == nil {
		return nil, "", nil
	}
	cur := ""
	if m.Snapshot.CurrentSnapshot != nil {
		cur = m.Snapshot.CurrentSnapshot.Value
	}
	return snapshotTree(m.Snapshot.RootSnapshotList, cur), cur, nil
}

// FindSnapshot finds a snapshot by MoRef or (unique) name.
func (c *Client) FindSnapshot(ctx context.Context, vm *VM, spec string) (types.ManagedObjectReference, error) {
	tree, _, err := c.Snapshots(ctx, vm)
	if err != nil {
		return types.ManagedObjectReference{}, err
	}
	flat, _ := FlattenSnapshots(tree)
	var hits []Snapshot
	for _, s := range flat {
		if s.MoRef == spec || s.Name == spec {
			hits = append(hits, s)
		}
	}
	switch len(hits) {
	case 0:
		return types.ManagedObjectReference{}, fmt.Errorf("%w: no snapshot %q on VM %s", ErrNotFound, spec, vm.Name)
	case 1:
		return types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: hits[0].MoRef}, nil
	}
	var refs []string
	for _, h := range hits {
		refs = append(refs, h.MoRef)
	}
	return types.ManagedObjectReference{}, fmt.Errorf("snapshot name %q is ambiguous on VM %s: give one of %s", spec, vm.Name, strings.Join(refs, ", "))
}

// RemoveSnapshot removes one snapshot (by name or MoRef), merging its
// delta into its parent; consolidate asks vSphere to consolidate the disks
// afterwards.
func (c *Client) RemoveSnapshot(ctx context.Context, vm *VM, spec string, removeChildren, consolidate bool) error {
	ref, err := c.FindSnapshot(ctx, vm, spec)
	if err != nil {
		return err
	}
	req := types.RemoveSnapshot_Task{This: ref, RemoveChildren: removeChildren, Consolidate: &consolidate}
	res, err := methods.RemoveSnapshot_Task(ctx, c.vim, &req)
	if err != nil {
		return fmt.Errorf("remove snapshot %q of %s: %w", spec, vm.Name, err)
	}
	if err := object.NewTask(c.vim, res.Returnval).Wait(ctx); err != nil {
		return fmt.Errorf("remove snapshot %q of %s: %w", spec, vm.Name, err)
	}
	return nil
}
