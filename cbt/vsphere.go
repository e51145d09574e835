package cbt

import (
	"context"
	"errors"
	"fmt"

	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// AllAllocated is the change ID that makes QueryChangedDiskAreas return the
// allocated areas of the disk: the baseline of a first round.
const AllAllocated = "*"

// Page is one answer of QueryChangedDiskAreas: the changed areas inside
// [Start, Start+Length).
type Page struct {
	Start, Length int64
	Areas         []block.Extent
}

// PageQuery asks for the changes since changeID, starting at offset.
type PageQuery func(ctx context.Context, offset int64, changeID string) (Page, error)

// VSphere is the provider for a vSphere disk with Changed Block Tracking.
// It is bound to one snapshot: ChangeID is the change ID read from the
// snapshot's disk backing, and Query asks about that snapshot.
type VSphere struct {
	Capacity int64
	ChangeID string
	Query    PageQuery
}

// Name implements Provider.
func (v *VSphere) Name() string { return "vsphere-cbt" }

// Changed implements Provider. since "" asks for the allocated areas ("*");
// a since whose UUID part differs from the snapshot's change ID means CBT was
// reset, and the result is a full resync with a warning.
func (v *VSphere) Changed(ctx context.Context, since string) (Result, error) {
	if v.ChangeID == "" {
		return Result{}, fmt.Errorf("change tracking is not active on this disk (the snapshot's disk backing has no change ID; enable CBT, which takes effect at the next stun)")
	}
	res := Result{Token: v.ChangeID}
	query := since
	switch {
	case since == "":
		query, res.Full = AllAllocated, true
	case ChangeIDEpoch(since) != ChangeIDEpoch(v.ChangeID):
		query, res.Full = AllAllocated, true
		res.Warning = fmt.Sprintf("change tracking was reset (stored change ID %q, disk now at %q): full resync", since, v.ChangeID)
	}
	exts, err := v.all(ctx, query)
	if err != nil && !res.Full && refusedChangeID(err) {
		// The server refuses the stored change ID (e.g. CBT was reset
		// without a visible epoch change): start over from the baseline.
		res.Full = true
		res.Warning = fmt.Sprintf("the server refused the stored change ID %q (%v): full resync", since, err)
		exts, err = v.all(ctx, AllAllocated)
	}
	if err != nil {
		return Result{}, err
	}
	res.Extents = exts
	return res, nil
}

// all pages through the disk: each call continues at Start+Length of the
// previous answer until the capacity is reached. An empty page is not the end.
func (v *VSphere) all(ctx context.Context, changeID string) ([]block.Extent, error) {
	var out []block.Extent
	for pos := int64(0); pos < v.Capacity; {
		p, err := v.Query(ctx, pos, changeID)
		if err != nil {
			return nil, fmt.Errorf("QueryChangedDiskAreas(changeId %q, startOffset %d): %w", changeID, pos, err)
		}
		next := p.Start + p.Length
		if p.Start > pos || next <= pos || p.Length < 0 {
			return nil, fmt.Errorf("QueryChangedDiskAreas(startOffset %d) answered [%d,+%d): no progress through the disk", pos, p.Start, p.Length)
		}
		for _, a := range p.Areas {
			if a.Off < p.Start || a.End() > next || a.Len < 0 {
				return nil, fmt.Errorf("QueryChangedDiskAreas(startOffset %d): area [%d,+%d) lies outside the page [%d,+%d)", pos, a.Off, a.Len, p.Start, p.Length)
			}
			out = append(out, a)
		}
		pos = next
	}
	return Normalize(out, v.Capacity), nil
}

// refusedChangeID reports whether err is the server refusing a change ID:
// vSphere answers a FileFault (or InvalidArgument) for a change ID it can no
// longer resolve. Other faults (authentication, network) are errors.
func refusedChangeID(err error) bool {
	var f interface{ Fault() types.BaseMethodFault }
	if !errors.As(err, &f) {
		return false
	}
	switch f.Fault().(type) {
	case *types.FileFault, *types.InvalidArgument:
		return true
	}
	return false
}

// SOAPQuery returns a PageQuery that calls QueryChangedDiskAreas on a VM for
// one disk of one snapshot. It calls the method directly: govmomi's
// object.VirtualMachine helper cannot express the "*" baseline.
func SOAPQuery(rt soap.RoundTripper, vm, snapshot types.ManagedObjectReference, deviceKey int32) PageQuery {
	return func(ctx context.Context, offset int64, changeID string) (Page, error) {
		snap := snapshot
		res, err := methods.QueryChangedDiskAreas(ctx, rt, &types.QueryChangedDiskAreas{
			This: vm, Snapshot: &snap, DeviceKey: deviceKey, StartOffset: offset, ChangeId: changeID,
		})
		if err != nil {
			return Page{}, err
		}
		r := res.Returnval
		p := Page{Start: r.StartOffset, Length: r.Length}
		for _, a := range r.ChangedArea {
			p.Areas = append(p.Areas, block.Extent{Off: a.Start, Len: a.Length, Type: block.Data})
		}
		return p, nil
	}
}
