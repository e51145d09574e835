package vmware_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/vmdk2kvm/vmdk2kvm/vmware"
	"github.com/vmdk2kvm/vmdk2kvm/vmware/vmwaretest"
)

func connect(t *testing.T, env *vmwaretest.Env) *vmware.Client {
	t.Helper()
	c, err := vmware.Connect(context.Background(), vmware.Config{
		URL: env.URL.String(), User: vmwaretest.User, Password: vmwaretest.Password, Thumbprint: env.Thumbprint(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// readVM reads a VM back with govmomi's property collector, not our code.
func readVM(t *testing.T, env *vmwaretest.Env, ref types.ManagedObjectReference) mo.VirtualMachine {
	t.Helper()
	var m mo.VirtualMachine
	if err := property.DefaultCollector(env.Client.Client).RetrieveOne(context.Background(), ref, nil, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func readName(t *testing.T, env *vmwaretest.Env, ref types.ManagedObjectReference) string {
	t.Helper()
	var ocs []types.ObjectContent
	if err := property.DefaultCollector(env.Client.Client).Retrieve(context.Background(), []types.ManagedObjectReference{ref}, []string{"name"}, &ocs); err != nil {
		t.Fatal(err)
	}
	for _, oc := range ocs {
		for _, p := range oc.PropSet {
			if p.Name == "name" {
				return p.Val.(string)
			}
		}
	}
	t.Fatalf("%v has no name", ref)
	return ""
}

func TestConnectErrors(t *testing.T) {
	env := vmwaretest.New(t)
	ctx := context.Background()
	good := vmware.Config{URL: env.URL.String(), User: vmwaretest.User, Password: vmwaretest.Password}

	t.Run("self-signed without thumbprint", func(t *testing.T) {
		_, err := vmware.Connect(ctx, good)
		var ue *vmware.UntrustedError
		if !errors.As(err, &ue) || !errors.Is(err, vmware.ErrUntrusted) {
			t.Fatalf("want UntrustedError, got %v", err)
		}
		if ue.Thumbprint != env.Thumbprint() || !strings.Contains(err.Error(), "--thumbprint "+env.Thumbprint()) {
			t.Fatalf("error does not show the server's thumbprint %s: %v", env.Thumbprint(), err)
		}
	})
	t.Run("wrong thumbprint", func(t *testing.T) {
		cfg := good
		cfg.Thumbprint = strings.Repeat("AB:", 19) + "AB"
		_, err := vmware.Connect(ctx, cfg)
		var ue *vmware.UntrustedError
		if !errors.As(err, &ue) || !ue.Mismatch {
			t.Fatalf("want a mismatch, got %v", err)
		}
	})
	t.Run("pinned", func(t *testing.T) {
		cfg := good
		cfg.Thumbprint = strings.ToLower(strings.ReplaceAll(env.Thumbprint(), ":", ""))
		c, err := vmware.Connect(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		if c.ServerThumbprint() != env.Thumbprint() {
			t.Fatalf("verified thumbprint %s, want %s", c.ServerThumbprint(), env.Thumbprint())
		}
		if !c.IsVC() {
			t.Fatal("the VPX model is a vCenter")
		}
	})
	t.Run("insecure", func(t *testing.T) {
		cfg := good
		cfg.Insecure = true
		c, err := vmware.Connect(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		c.Close(ctx)
	})
	t.Run("wrong password", func(t *testing.T) {
		cfg := good
		cfg.Thumbprint = env.Thumbprint()
		cfg.Password = "not-" + vmwaretest.Password
		_, err := vmware.Connect(ctx, cfg)
		if !errors.Is(err, vmware.ErrLogin) {
			t.Fatalf("want ErrLogin, got %v", err)
		}
		if strings.Contains(err.Error(), cfg.Password) || strings.Contains(err.Error(), "\n") {
			t.Fatalf("bad error text: %q", err)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		cfg := good
		cfg.URL = "https://" + addr
		_, err = vmware.Connect(ctx, cfg)
		if !errors.Is(err, vmware.ErrUnreachable) || !strings.Contains(err.Error(), addr) {
			t.Fatalf("want ErrUnreachable naming %s, got %v", addr, err)
		}
	})
	t.Run("password in URL refused", func(t *testing.T) {
		cfg := good
		cfg.URL = "https://u:p@" + env.URL.Host
		if _, err := vmware.Connect(ctx, cfg); err == nil || strings.Contains(err.Error(), ":p@") {
			t.Fatalf("got %v", err)
		}
	})
}

// TestSessionExpiry terminates our session on the server: the next call
// logs in again by itself.
func TestSessionExpiry(t *testing.T) {
	env := vmwaretest.New(t)
	ctx := context.Background()
	c := connect(t, env)
	if _, err := c.FindVM(ctx, vmwaretest.VMWeb); err != nil {
		t.Fatal(err)
	}
	var sm mo.SessionManager
	pc := property.DefaultCollector(env.Client.Client)
	if err := pc.RetrieveOne(ctx, *env.Client.ServiceContent.SessionManager, []string{"sessionList", "currentSession"}, &sm); err != nil {
		t.Fatal(err)
	}
	var others []string
	for _, s := range sm.SessionList {
		if s.Key != sm.CurrentSession.Key {
			others = append(others, s.Key)
		}
	}
	if len(others) == 0 {
		t.Fatal("our session is not listed")
	}
	if err := env.Client.SessionManager.TerminateSession(ctx, others); err != nil {
		t.Fatal(err)
	}
	vm, err := c.FindVM(ctx, vmwaretest.VMWeb)
	if err != nil {
		t.Fatalf("after the session was terminated: %v", err)
	}
	if vm.Name != vmwaretest.VMWeb {
		t.Fatal(vm.Name)
	}
}

func TestParseURI(t *testing.T) {
	u, err := vmware.ParseURI("vsphere://alice@vc.example.com:8443/DC0/vm/prod/web%20server")
	if err != nil {
		t.Fatal(err)
	}
	want := vmware.URI{User: "alice", Server: "vc.example.com:8443", Datacenter: "DC0", Path: "/DC0/vm/prod/web server"}
	if *u != want {
		t.Fatalf("got %+v", *u)
	}
	for _, bad := range []string{"vsphere://vc/DC0/host/x", "vsphere://vc/DC0", "https://vc/DC0/vm/x", "vsphere://a:pw@vc/DC0/vm/x", "vsphere:///DC0/vm/x"} {
		if _, err := vmware.ParseURI(bad); err == nil {
			t.Errorf("%s: accepted", bad)
		} else if strings.Contains(err.Error(), "pw") && !strings.Contains(bad, "pw@") {
			t.Errorf("%s: %v", bad, err)
		}
	}
	if _, err := vmware.ParseURI("vsphere://a:pw@vc/DC0/vm/x"); err == nil || strings.Contains(err.Error(), "pw") {
		t.Fatalf("password leaks or is accepted: %v", err)
	}
}

func TestFindVM(t *testing.T) {
	env := vmwaretest.New(t)
	ctx := context.Background()
	c := connect(t, env)
	ref := env.VMs[vmwaretest.VMWeb]
	m := readVM(t, env, ref)
	for _, spec := range []string{
		vmwaretest.VMWeb, "/DC0/vm/" + vmwaretest.VMWeb, "DC0/vm/" + vmwaretest.VMWeb, ref.Value,
		"VirtualMachine:" + ref.Value, m.Config.Uuid, strings.ToUpper(m.Config.InstanceUuid),
	} {
		vm, err := c.FindVM(ctx, spec)
		if err != nil {
			t.Fatalf("%s: %v", spec, err)
		}
		if vm.Ref != ref || vm.Name != vmwaretest.VMWeb || vm.Path != "/DC0/vm/web01" || vm.Datacenter != "DC0" || vm.DCPath != "DC0" {
			t.Fatalf("%s: got %+v", spec, vm)
		}
	}
	// The default VMs of the model are found too, in the other datacenter.
	vm, err := c.FindVM(ctx, "DC1_H0_VM0")
	if err != nil || vm.Datacenter != "DC1" {
		t.Fatalf("DC1_H0_VM0: %+v %v", vm, err)
	}
	// A second web01, in DC1: the name is ambiguous, the paths are not.
	finder := find.NewFinder(env.Client.Client, false)
	dc1, err := finder.Datacenter(ctx, "DC1")
	if err != nil {
		t.Fatal(err)
	}
	finder.SetDatacenter(dc1)
	host, err := finder.HostSystem(ctx, "DC1_H0")
	if err != nil {
		t.Fatal(err)
	}
	pool, _ := host.ResourcePool(ctx)
	folders, _ := dc1.Folders(ctx)
	task, err := folders.VmFolder.CreateVM(ctx, types.VirtualMachineConfigSpec{Name: vmwaretest.VMWeb, GuestId: "otherGuest",
		Files: &types.VirtualMachineFileInfo{VmPathName: "[LocalDS_0] web01-dc1/web01.vmx"}}, pool, host)
	if err != nil || task.Wait(ctx) != nil {
		t.Fatalf("create a second web01: %v", err)
	}
	if _, err := c.FindVM(ctx, vmwaretest.VMWeb); err == nil || !strings.Contains(err.Error(), "ambiguous") || !strings.Contains(err.Error(), "/DC1/vm/web01") || !strings.Contains(err.Error(), "/DC0/vm/web01") {
		t.Fatalf("want an ambiguity naming both paths, got %v", err)
	}
	if vm, err := c.FindVM(ctx, "/DC1/vm/web01"); err != nil || vm.Datacenter != "DC1" {
		t.Fatalf("/DC1/vm/web01: %+v %v", vm, err)
	}
	for _, spec := range []string{"nope", "/DC0/vm/nope", "vm-99999", "4213a1b2-ffff-4c3d-9e8f-aabbccddee01"} {
		_, err := c.FindVM(ctx, spec)
		if !errors.Is(err, vmware.ErrNotFound) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: want a one-line ErrNotFound, got %v", spec, err)
		}
	}
}

func TestList(t *testing.T) {
	env := vmwaretest.New(t)
	ctx := context.Background()
	c := connect(t, env)
	names := func(p string) map[string]vmware.Entry {
		es, err := c.List(ctx, p)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		out := map[string]vmware.Entry{}
		for _, e := range es {
			out[e.Name] = e
		}
		return out
	}
	root := names("/")
	if root["DC0"].Type != "Datacenter" || root["DC1"].Type != "Datacenter" {
		t.Fatalf("root: %+v", root)
	}
	vms := names("/DC0/vm")
	for _, n := range []string{vmwaretest.VMWeb, vmwaretest.VMWin, vmwaretest.VMLinked, vmwaretest.VMDB} {
		e, ok := vms[n]
		if !ok || e.Type != "VirtualMachine" || e.MoRef != env.VMs[n].Value {
			t.Fatalf("%s: %+v", n, e)
		}
	}
	if s := vms[vmwaretest.VMWeb].Summary; s != "poweredOn, debian11_64Guest" {
		t.Fatalf("web01 summary %q", s)
	}
	ds := names("/DC0/datastore")
	if e := ds[vmwaretest.Datastore]; e.Type != "Datastore" || !strings.HasPrefix(e.Summary, "OTHER") && !strings.Contains(e.Summary, "free of") {
		t.Fatalf("datastore: %+v", e)
	}
	if _, err := c.List(ctx, "/DC9"); !errors.Is(err, vmware.ErrNotFound) {
		t.Fatalf("want ErrNotFound, got %v", err)
	}
}

// TestInfoMatchesSimulator holds every field of Info against what the
// simulator holds, read back with the property collector.
func TestInfoMatchesSimulator(t *testing.T) {
	env := vmwaretest.New(t)
	ctx := context.Background()
	c := connect(t, env)
	var all []types.ManagedObjectReference
	for _, r := range env.VMs {
		all = append(all, r)
	}
	// plus every default VM of the model
	for _, n := range []string{"DC0_H0_VM0", "DC0_C0_RP0_VM0", "DC1_H0_VM0"} {
		vm, err := c.FindVM(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, vm.Ref)
	}
	for _, ref := range all {
		m := readVM(t, env, ref)
		t.Run(m.Name, func(t *testing.T) {
			vm, err := c.FindVM(ctx, ref.Value)
			if err != nil {
				t.Fatal(err)
			}
			info, err := c.Info(ctx, vm)
			if err != nil {
				t.Fatal(err)
			}
			checkInfo(t, env, m, info)
		})
	}
	// And the values the harness set, so a wrong reading of both sides fails.
	vm, _ := c.FindVM(ctx, vmwaretest.VMWin)
	win, err := c.Info(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	if win.Firmware != "efi" || !win.SecureBoot || !win.CBT || win.Disks[0].ChangeID != vmwaretest.WinChangeID || win.Disks[0].ControllerType != "nvme" || win.Disks[0].Address != "nvme0:0" || !win.Disks[0].CBT {
		t.Fatalf("win01: %+v", win)
	}
	vm, _ = c.FindVM(ctx, vmwaretest.VMLinked)
	lc, err := c.Info(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	ch := lc.Disks[0].Chain
	if len(ch) != 2 || ch[0].Type != "seSparse" || ch[1].Type != "flat" || ch[0].Parent != ch[1].File ||
		ch[0].DataFiles[0] != "[vmstore] linked01/linked01-000001-sesparse.vmdk" || ch[1].DataFiles[0] != "[vmstore] golden/golden-flat.vmdk" {
		t.Fatalf("linked clone chain: %+v", ch)
	}
}

func checkInfo(t *testing.T, env *vmwaretest.Env, m mo.VirtualMachine, info *vmware.VMInfo) {
	t.Helper()
	eq := func(what string, got, want any) {
		t.Helper()
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: got %v, want %v", what, got, want)
		}
	}
	eq("name", info.Name, m.Name)
	eq("moref", info.MoRef, m.Self.Value)
	eq("uuid", info.UUID, m.Config.Uuid)
	eq("instance uuid", info.InstanceUUID, m.Config.InstanceUuid)
	eq("power", info.PowerState, string(m.Runtime.PowerState))
	eq("firmware", info.Firmware, m.Config.Firmware)
	sb := m.Config.BootOptions != nil && m.Config.BootOptions.EfiSecureBootEnabled != nil && *m.Config.BootOptions.EfiSecureBootEnabled
	eq("secure boot", info.SecureBoot, sb)
	eq("guest", info.GuestID, m.Config.GuestId)
	eq("hw version", info.HardwareVersion, m.Config.Version)
	eq("cpus", info.CPUs, m.Config.Hardware.NumCPU)
	eq("memory", info.MemoryMiB, int64(m.Config.Hardware.MemoryMB))
	eq("host", info.Host, readName(t, env, *m.Runtime.Host))
	eq("vmx", info.VMXPath, m.Config.Files.VmPathName)
	eq("cbt", info.CBT, m.Config.ChangeTrackingEnabled != nil && *m.Config.ChangeTrackingEnabled)
	eq("cbt supported", info.CBTSupported, m.Capability.ChangeTrackingSupported)

	var nics []vmware.NIC
	var disks []*types.VirtualDisk
	ctlType := map[int32]string{}
	for _, d := range m.Config.Hardware.Device {
		switch x := d.(type) {
		case types.BaseVirtualEthernetCard:
			c := x.GetVirtualEthernetCard()
			var net string
			switch b := c.Backing.(type) {
			case *types.VirtualEthernetCardNetworkBackingInfo:
				net = b.DeviceName
			case *types.VirtualEthernetCardDistributedVirtualPortBackingInfo:
				net = readName(t, env, types.ManagedObjectReference{Type: "DistributedVirtualPortgroup", Value: b.Port.PortgroupKey})
			}
			adapter := map[string]string{"*types.VirtualVmxnet3": "vmxnet3", "*types.VirtualE1000e": "e1000e", "*types.VirtualE1000": "e1000", "*types.VirtualPCNet32": "pcnet32", "*types.VirtualVmxnet2": "vmxnet2"}[fmt.Sprintf("%T", d)]
			nics = append(nics, vmware.NIC{Key: c.Key, MAC: c.MacAddress, Network: net, Adapter: adapter, Connected: c.Connectable != nil && c.Connectable.StartConnected})
		case *types.VirtualDisk:
			disks = append(disks, x)
		case *types.ParaVirtualSCSIController:
			ctlType[x.Key] = "pvscsi"
		case *types.VirtualLsiLogicController:
			ctlType[x.Key] = "lsilogic"
		case *types.VirtualLsiLogicSASController:
			ctlType[x.Key] = "lsilogic-sas"
		case *types.VirtualAHCIController:
			ctlType[x.Key] = "ahci"
		case *types.VirtualNVMEController:
			ctlType[x.Key] = "nvme"
		case *types.VirtualIDEController:
			ctlType[x.Key] = "ide"
		}
	}
	if len(info.NICs) != len(nics) {
		t.Fatalf("NICs: got %d, want %d", len(info.NICs), len(nics))
	}
	for i, n := range nics {
		g := info.NICs[i]
		eq("nic key", g.Key, n.Key)
		eq("nic mac", g.MAC, n.MAC)
		eq("nic network", g.Network, n.Network)
		eq("nic adapter", g.Adapter, n.Adapter)
		eq("nic start connected", g.Connected, n.Connected)
	}
	if len(info.Controllers) != len(ctlType) {
		t.Errorf("controllers: got %+v, want %v", info.Controllers, ctlType)
	}
	for _, c := range info.Controllers {
		eq("controller type", c.Type, ctlType[c.Key])
	}
	if len(info.Disks) != len(disks) {
		t.Fatalf("disks: got %d, want %d", len(info.Disks), len(disks))
	}
	for i, d := range disks {
		g := info.Disks[i]
		eq("disk key", g.Key, d.Key)
		eq("capacity", g.CapacityBytes, d.CapacityInBytes)
		eq("controller", g.ControllerKey, d.ControllerKey)
		eq("controller type", g.ControllerType, ctlType[d.ControllerKey])
		eq("unit", g.Unit, *d.UnitNumber)
		fb := d.Backing.(types.BaseVirtualDeviceFileBackingInfo).GetVirtualDeviceFileBackingInfo()
		eq("file", g.File, fb.FileName)
		if fb.Datastore != nil {
			eq("datastore", g.Datastore, readName(t, env, *fb.Datastore))
		}
		var chain []string
		var mode, changeID string
		switch b := d.Backing.(type) {
		case *types.VirtualDiskFlatVer2BackingInfo:
			mode, changeID = b.DiskMode, b.ChangeId
			want := "thick-lazy"
			if b.ThinProvisioned != nil && *b.ThinProvisioned {
				want = "thin"
			} else if b.EagerlyScrub != nil && *b.EagerlyScrub {
				want = "thick-eager"
			}
			eq("provisioning", g.Provisioning, want)
			for p := b; p != nil; p = p.Parent {
				chain = append(chain, p.FileName)
			}
		case *types.VirtualDiskSeSparseBackingInfo:
			mode, changeID = b.DiskMode, b.ChangeId
			for p := b; p != nil; p = p.Parent {
				chain = append(chain, p.FileName)
			}
		case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
			mode, changeID = b.DiskMode, b.ChangeId
			eq("provisioning", g.Provisioning, "rdm-"+strings.TrimSuffix(b.CompatibilityMode, "Mode"))
			chain = []string{b.FileName}
		}
		eq("mode", g.Mode, mode)
		eq("independent", g.Independent, strings.HasPrefix(mode, "independent"))
		eq("change id", g.ChangeID, changeID)
		wantCBT := m.Config.ChangeTrackingEnabled != nil && *m.Config.ChangeTrackingEnabled
		for _, o := range m.Config.ExtraConfig {
			if ov := o.GetOptionValue(); ov.Key == g.Address+".ctkEnabled" {
				wantCBT = strings.EqualFold(fmt.Sprint(ov.Value), "true")
			}
		}
		eq("disk cbt", g.CBT, wantCBT)
		var got []string
		for _, l := range g.Chain {
			got = append(got, l.File)
		}
		eq("chain", got, chain)
	}
	// Snapshot tree: names and MoRefs, depth first.
	var want []string
	var walk func([]types.VirtualMachineSnapshotTree, int)
	walk = func(ts []types.VirtualMachineSnapshotTree, depth int) {
		for _, s := range ts {
			want = append(want, fmt.Sprintf("%d:%s:%s", depth, s.Name, s.Snapshot.Value))
			walk(s.ChildSnapshotList, depth+1)
		}
	}
	cur := ""
	if m.Snapshot != nil {
		walk(m.Snapshot.RootSnapshotList, 0)
		if m.Snapshot.CurrentSnapshot != nil {
			cur = m.Snapshot.CurrentSnapshot.Value
		}
	}
	flat, depth := vmware.FlattenSnapshots(info.Snapshots)
	var got []string
	for i, s := range flat {
		got = append(got, fmt.Sprintf("%d:%s:%s", depth[i], s.Name, s.MoRef))
		eq("current flag", s.Current, s.MoRef == cur)
	}
	eq("snapshots", got, want)
	eq("current snapshot", info.CurrentSnapshot, cur)
}

// snapCounter counts CreateSnapshot calls and passes them on.
type snapCounter struct {
	*simulator.VirtualMachine
	n *atomic.Int32
}

func (v *snapCounter) CreateSnapshotTask(ctx *simulator.Context, req *types.CreateSnapshot_Task) soap.HasFault {
	v.n.Add(1)
	return v.VirtualMachine.CreateSnapshotTask(ctx, req)
}

func TestSnapshotsAndCBT(t *testing.T) {
	env := vmwaretest.New(t)
	ctx := context.Background()
	c := connect(t, env)
	db, err := c.FindVM(ctx, vmwaretest.VMDB)
	if err != nil {
		t.Fatal(err)
	}

	// Snapshots: create two, list, remove by name and by MoRef.
	r1, err := c.CreateSnapshot(ctx, db, "one", vmware.SnapshotOptions{Description: "first"})
	if err != nil {
		t.Fatal(err)
	}
	r2, err := c.CreateSnapshot(ctx, db, "two", vmware.SnapshotOptions{Quiesce: true})
	if err != nil {
		t.Fatal(err)
	}
	m := readVM(t, env, db.Ref)
	if m.Snapshot == nil || m.Snapshot.CurrentSnapshot.Value != r2 || m.Snapshot.RootSnapshotList[0].Snapshot.Value != r1 ||
		m.Snapshot.RootSnapshotList[0].ChildSnapshotList[0].Snapshot.Value != r2 || !m.Snapshot.RootSnapshotList[0].ChildSnapshotList[0].Quiesced {
		t.Fatalf("snapshot tree on the server: %+v", m.Snapshot)
	}
	tree, cur, err := c.Snapshots(ctx, db)
	if err != nil || cur != r2 || len(tree) != 1 || tree[0].Name != "one" || tree[0].Description != "first" || tree[0].Children[0].Name != "two" {
		t.Fatalf("list: %+v %s %v", tree, cur, err)
	}
	// CBT cannot be enabled while snapshots exist.
	if _, err := c.EnableCBT(ctx, db, true); !errors.Is(err, vmware.ErrCBTUnavailable) {
		t.Fatalf("want ErrCBTUnavailable with snapshots, got %v", err)
	}
	if err := c.RemoveSnapshot(ctx, db, "two", false, true); err != nil {
		t.Fatal(err)
	}
	if err := c.RemoveSnapshot(ctx, db, r1, false, true); err != nil {
		t.Fatal(err)
	}
	if err := c.RemoveSnapshot(ctx, db, "nope", false, true); !errors.Is(err, vmware.ErrNotFound) {
		t.Fatalf("want ErrNotFound, got %v", err)
	}
	if m := readVM(t, env, db.Ref); m.Snapshot != nil {
		t.Fatalf("snapshots left: %+v", m.Snapshot)
	}

	// CBT on a running VM: the flags are set and one stun snapshot is made and removed.
	task, err := object.NewVirtualMachine(env.Client.Client, db.Ref).PowerOn(ctx)
	if err != nil || task.Wait(ctx) != nil {
		t.Fatal(err)
	}
	var n atomic.Int32
	env.Wrap(db.Ref, &snapCounter{VirtualMachine: env.SimVM(db.Ref), n: &n})
	res, err := c.EnableCBT(ctx, db, true)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Stunned || res.Effective != "now" || res.WasEnabled || n.Load() != 1 {
		t.Fatalf("result %+v, %d snapshots made", res, n.Load())
	}
	m = readVM(t, env, db.Ref)
	if m.Config.ChangeTrackingEnabled == nil || !*m.Config.ChangeTrackingEnabled || m.Snapshot != nil {
		t.Fatalf("server: cbt %v, snapshot %+v", m.Config.ChangeTrackingEnabled, m.Snapshot)
	}
	extra := map[string]string{}
	for _, o := range m.Config.ExtraConfig {
		extra[o.GetOptionValue().Key] = fmt.Sprint(o.GetOptionValue().Value)
	}
	if extra["scsi0:0.ctkEnabled"] != "TRUE" || extra["scsi0:1.ctkEnabled"] != "" || !reflect.DeepEqual(res.Disks, []string{"scsi0:0"}) || len(res.Skipped) != 1 {
		t.Fatalf("per-disk flags %v, result %+v", extra, res)
	}

	// The linked clone's seSparse disk cannot be tracked (the simulator says so).
	lc, _ := c.FindVM(ctx, vmwaretest.VMLinked)
	if _, err := c.EnableCBT(ctx, lc, true); !errors.Is(err, vmware.ErrCBTUnavailable) {
		t.Fatalf("linked clone: want ErrCBTUnavailable, got %v", err)
	}
}

func TestChangedAreasAllocated(t *testing.T) {
	env := vmwaretest.New(t)
	ctx := context.Background()
	c := connect(t, env)
	vm, _ := c.FindVM(ctx, vmwaretest.VMWin)
	info, err := c.Info(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	areas, err := c.ChangedAreas(ctx, vm, "", info.Disks[0].Key, info.Disks[0].CapacityBytes, "*")
	if err != nil {
		t.Fatal(err)
	}
	if len(areas) < 2 { // the harness answers one area per page: paging is needed
		t.Fatalf("areas %+v", areas)
	}
	got, err := c.AllocatedBytes(ctx, vm, "", info.Disks[0])
	if err != nil {
		t.Fatal(err)
	}
	want, err := env.AllocatedBytes("win01/win01-flat.vmdk")
	if err != nil {
		t.Fatal(err)
	}
	if got != want || got == 0 || got >= info.Disks[0].CapacityBytes {
		t.Fatalf("allocated %d, the file has %d of %d", got, want, info.Disks[0].CapacityBytes)
	}
	// Without the harness's method (web01), the error says so, in one line.
	web, _ := c.FindVM(ctx, vmwaretest.VMWeb)
	if _, err := c.ChangedAreas(ctx, web, "", 2000, vmwaretest.Web01Disk0, "*"); err == nil || strings.Contains(err.Error(), "\n") {
		t.Fatalf("got %v", err)
	}
}

func fetch(t *testing.T, u string, off, n int64) []byte {
	t.Helper()
	req, _ := http.NewRequest("GET", u, nil)
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	res, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusPartialContent {
		t.Fatalf("GET %s: %s", u, res.Status)
	}
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestResolveDisks(t *testing.T) {
	env := vmwaretest.New(t)
	ctx := context.Background()
	c := connect(t, env)
	resolve := func(name, snap string) []vmware.DiskPath {
		vm, err := c.FindVM(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		ps, err := c.ResolveDisks(ctx, vm, snap)
		if err != nil {
			t.Fatal(err)
		}
		return ps
	}

	// Powered-off win01: the /folder URLs serve the real bytes of the data file.
	win := resolve(vmwaretest.VMWin, "")
	if len(win) != 1 || win[0].Method != "https" || win[0].Pinned || win[0].DatastoreType == "" {
		t.Fatalf("win01: %+v", win)
	}
	l := win[0].Layers[0]
	if !strings.Contains(l.URL, "/folder/win01/win01.vmdk?") || !strings.Contains(l.URL, "dcPath=DC0") || !strings.Contains(l.URL, "dsName=vmstore") {
		t.Fatalf("URL %s", l.URL)
	}
	local, err := os.ReadFile(env.Path("win01/win01-flat.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	if got := fetch(t, l.DataURLs[0], 4096, 8192); !bytes.Equal(got, local[4096:4096+8192]) {
		t.Fatal("the data URL serves other bytes than the flat file")
	}
	if got := fetch(t, l.URL, 0, 21); string(got) != "# Disk DescriptorFile" {
		t.Fatalf("descriptor URL: %q", got)
	}
	if win[0].VDDK.VM != "moref="+env.VMs[vmwaretest.VMWin].Value || win[0].VDDK.Thumbprint != env.Thumbprint() || win[0].VDDK.File != "[vmstore] win01/win01.vmdk" {
		t.Fatalf("vddk: %+v", win[0].VDDK)
	}
	if win[0].SSH != "ssh://DC0_H0/vmfs/volumes/vmstore/win01/win01.vmdk" {
		t.Fatalf("ssh: %s", win[0].SSH)
	}

	// The linked clone: both files of the chain, each readable.
	lc := resolve(vmwaretest.VMLinked, "")
	if len(lc[0].Layers) != 2 {
		t.Fatalf("linked01: %+v", lc)
	}
	delta, _ := os.ReadFile(env.Path("linked01/linked01-000001-sesparse.vmdk"))
	if got := fetch(t, lc[0].Layers[0].DataURLs[0], 0, 512); !bytes.Equal(got, delta[:512]) {
		t.Fatal("seSparse data URL")
	}
	if !strings.HasSuffix(strings.Split(lc[0].Layers[1].DataURLs[0], "?")[0], "/folder/golden/golden-flat.vmdk") {
		t.Fatalf("parent data URL %s", lc[0].Layers[1].DataURLs[0])
	}

	// Running web01: pinned to its host at the current state, not at a snapshot;
	// the independent disk is flagged.
	web := resolve(vmwaretest.VMWeb, "")
	if !web[0].Pinned || !strings.HasPrefix(web[0].HostURL, "https://DC0_H0/folder/web01/web01.vmdk?") || !strings.Contains(web[0].HostURL, "dcPath=ha-datacenter") {
		t.Fatalf("web01 current: %+v", web[0])
	}
	if !strings.Contains(strings.Join(web[2].Warnings, " "), "independent") {
		t.Fatalf("independent disk not flagged: %+v", web[2])
	}
	snap := resolve(vmwaretest.VMWeb, "pre-upgrade")
	m := readVM(t, env, env.VMs[vmwaretest.VMWeb])
	if len(snap) != 3 || snap[0].Pinned || snap[0].Snapshot != m.Snapshot.CurrentSnapshot.Value || snap[0].VDDK.Snapshot != snap[0].Snapshot {
		t.Fatalf("web01 at snapshot: %+v", snap[0])
	}

	// RDM: no file path at all.
	db := resolve(vmwaretest.VMDB, "")
	if db[1].Method != "none" || db[1].URL != "" || !strings.Contains(strings.Join(db[1].Warnings, " "), "raw device mapping") {
		t.Fatalf("rdm: %+v", db[1])
	}

	// vSAN: VDDK only. Make the datastore a vSAN one in the simulator.
	dsRef := env.SimVM(env.VMs[vmwaretest.VMDB]).Datastore[0]
	env.Model.Map().Get(dsRef).(*simulator.Datastore).Summary.Type = "vsan"
	db = resolve(vmwaretest.VMDB, "")
	if db[0].Method != "vddk" || db[0].URL != "" || !strings.Contains(strings.Join(db[0].Warnings, " "), "VDDK") {
		t.Fatalf("vsan: %+v", db[0])
	}
}

// loginCounter counts logins and passes them on.
type loginCounter struct {
	*simulator.SessionManager
	n *atomic.Int32
}

func (s *loginCounter) Login(ctx *simulator.Context, req *types.Login) soap.HasFault {
	s.n.Add(1)
	return s.SessionManager.Login(ctx, req)
}

// TestKeepAlive makes the simulator expire idle sessions after 300 ms: with
// keep-alive the session survives 1.2 s of idleness on one login; without,
// the next call logs in again by itself.
func TestKeepAlive(t *testing.T) {
	env := vmwaretest.New(t)
	ctx := context.Background()
	om := object.NewOptionManager(env.Client.Client, *env.Client.ServiceContent.Setting)
	if err := om.Update(ctx, []types.BaseOptionValue{&types.OptionValue{Key: "config.vmacore.soap.sessionTimeout", Value: "300ms"}}); err != nil {
		t.Fatal(err)
	}
	smRef := *env.Client.ServiceContent.SessionManager
	var n atomic.Int32
	env.Wrap(smRef, &loginCounter{SessionManager: env.Model.Map().Get(smRef).(*simulator.SessionManager), n: &n})
	for _, tc := range []struct {
		keepAlive time.Duration
		logins    int32
	}{{100 * time.Millisecond, 1}, {-1, 2}} {
		n.Store(0)
		c, err := vmware.Connect(ctx, vmware.Config{URL: env.URL.String(), User: vmwaretest.User, Password: vmwaretest.Password, Thumbprint: env.Thumbprint(), KeepAlive: tc.keepAlive})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.FindVM(ctx, vmwaretest.VMWeb); err != nil {
			t.Fatal(err)
		}
		time.Sleep(1200 * time.Millisecond)
		if _, err := c.FindVM(ctx, vmwaretest.VMWin); err != nil {
			t.Fatalf("keep-alive %v: %v", tc.keepAlive, err)
		}
		if got := n.Load(); got != tc.logins {
			t.Errorf("keep-alive %v: %d logins, want %d", tc.keepAlive, got, tc.logins)
		}
		c.Close(ctx)
	}
}

// TestESXi connects to a lone ESXi (the simulator's ESX model): no vCenter,
// the datacenter is ha-datacenter and URLs go to the host itself.
func TestESXi(t *testing.T) {
	m := simulator.ESX()
	if err := m.Create(); err != nil {
		t.Fatal(err)
	}
	defer m.Remove()
	m.Service.TLS = new(tls.Config)
	m.Service.Listen = &url.URL{User: url.UserPassword("root", "esx-pass")}
	s := m.Service.NewServer()
	defer s.Close()
	ctx := context.Background()
	tp, _ := vmware.Thumbprints(s.Certificate().Raw)
	c, err := vmware.Connect(ctx, vmware.Config{URL: s.URL.Host, User: "root", Password: "esx-pass", Thumbprint: tp})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	if c.IsVC() {
		t.Fatal("ESX model reported as vCenter")
	}
	es, err := c.List(ctx, "/ha-datacenter/vm")
	if err != nil || len(es) == 0 {
		t.Fatalf("list: %v %v", es, err)
	}
	vm, err := c.FindVM(ctx, es[0].Name)
	if err != nil {
		t.Fatal(err)
	}
	if vm.DCPath != "ha-datacenter" {
		t.Fatalf("dc path %q", vm.DCPath)
	}
	ps, err := c.ResolveDisks(ctx, vm, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) == 0 || !strings.HasPrefix(ps[0].URL, "https://"+s.URL.Host+"/folder/") || !strings.Contains(ps[0].URL, "dcPath=ha-datacenter") || ps[0].HostURL != "" {
		t.Fatalf("paths %+v", ps)
	}
}
