package cbttest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/cbt"
)

func snapshot(t *testing.T, h *Harness, name string) (types.ManagedObjectReference, string) {
	t.Helper()
	ctx := context.Background()
	vm := object.NewVirtualMachine(h.Env.Client.Client, h.VM)
	task, err := vm.CreateSnapshot(ctx, name, "", false, false)
	if err != nil {
		t.Fatal(err)
	}
	res, err := task.WaitForResult(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ref := res.Result.(types.ManagedObjectReference)
	var s mo.VirtualMachineSnapshot
	if err := vm.Properties(ctx, ref, []string{"config.hardware"}, &s); err != nil {
		t.Fatal(err)
	}
	for _, d := range s.Config.Hardware.Device {
		if vd, ok := d.(*types.VirtualDisk); ok && vd.Key == DiskKey {
			return ref, vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo).ChangeId
		}
	}
	t.Fatal("disk not in snapshot")
	return ref, ""
}

func removeSnapshot(t *testing.T, h *Harness, ref types.ManagedObjectReference) {
	t.Helper()
	ctx := context.Background()
	task, err := object.NewVirtualMachine(h.Env.Client.Client, h.VM).RemoveSnapshot(ctx, ref.Value, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Wait(ctx); err != nil {
		t.Fatal(err)
	}
}

// The provider pages through a harness that answers in small pages with
// empty pages mid-disk; what it reports is exactly what the harness wrote.
func TestVSphereProviderAgainstSimulator(t *testing.T) {
	ctx := context.Background()
	h := New(t, Options{Size: 32 << 20, CBT: true, PageAreas: 2, PageBytes: 2 << 20})
	rt := h.Env.Client.Client

	snap1, id1 := snapshot(t, h, "s1")
	if id1 == "" || !strings.HasSuffix(id1, "/1") {
		t.Fatalf("snapshot change ID %q", id1)
	}
	p := &cbt.VSphere{Capacity: h.Size(), ChangeID: id1, Query: cbt.SOAPQuery(rt, h.VM, snap1, DiskKey)}
	r, err := p.Changed(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	alloc, err := dataAreas(h.Flat, h.Size())
	if err != nil {
		t.Fatal(err)
	}
	if !r.Full || r.Token != id1 || !equal(r.Extents, cbt.Normalize(alloc, h.Size())) {
		t.Fatalf("baseline: full=%v token=%q, %d extents, want %d", r.Full, r.Token, len(r.Extents), len(alloc))
	}
	if h.CBT.Queries < 16 {
		t.Fatalf("only %d queries for 16 pages of 2 MiB", h.CBT.Queries)
	}
	removeSnapshot(t, h, snap1)

	// Two writes near the end: the pages before them are empty.
	if err := h.Write(30<<20, make([]byte, 8192)); err != nil {
		t.Fatal(err)
	}
	if err := h.Discard(31<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	snap2, id2 := snapshot(t, h, "s2")
	p = &cbt.VSphere{Capacity: h.Size(), ChangeID: id2, Query: cbt.SOAPQuery(rt, h.VM, snap2, DiskKey)}
	r, err = p.Changed(ctx, id1)
	if err != nil {
		t.Fatal(err)
	}
	want := []block.Extent{{Off: 30 << 20, Len: 8192}, {Off: 31 << 20, Len: 1 << 20}}
	if r.Full || !equal(r.Extents, want) || r.Token != id2 {
		t.Fatalf("incremental: full=%v %v token %q", r.Full, r.Extents, r.Token)
	}
	// The running VM moves on to another change ID than the snapshot's
	// (the harness does it when the snapshot task has finished).
	moved := false
	for i := 0; i < 100 && !moved; i++ {
		var o mo.VirtualMachine
		if err := object.NewVirtualMachine(rt, h.VM).Properties(ctx, h.VM, []string{"config.hardware"}, &o); err != nil {
			t.Fatal(err)
		}
		for _, d := range o.Config.Hardware.Device {
			if vd, ok := d.(*types.VirtualDisk); ok {
				id := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo).ChangeId
				moved = id != id2 && cbt.ChangeIDEpoch(id) == cbt.ChangeIDEpoch(id2)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !moved {
		t.Fatalf("VM backing stays at the snapshot's change ID %q", id2)
	}
	removeSnapshot(t, h, snap2)

	// A reset: the stored change ID's epoch is gone → full resync, warned.
	h.ResetCBT()
	snap3, id3 := snapshot(t, h, "s3")
	if cbt.ChangeIDEpoch(id3) == cbt.ChangeIDEpoch(id2) {
		t.Fatal("reset kept the epoch")
	}
	p = &cbt.VSphere{Capacity: h.Size(), ChangeID: id3, Query: cbt.SOAPQuery(rt, h.VM, snap3, DiskKey)}
	r, err = p.Changed(ctx, id2)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Full || r.Warning == "" {
		t.Fatalf("reset not detected: %+v", r)
	}
	// The server itself refuses an old change ID with a fault.
	_, err = cbt.SOAPQuery(rt, h.VM, snap3, DiskKey)(ctx, 0, id2)
	if err == nil {
		t.Fatal("old change ID accepted after reset")
	}
}

func equal(a, b []block.Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Off != b[i].Off || a[i].Len != b[i].Len {
			return false
		}
	}
	return true
}
