// Package vmwaretest builds a vSphere inventory in govmomi's simulator for
// tests: a VPX model (vCenter) with two datacenters, a cluster and a standalone
// host per datacenter, and a local datastore ("vmstore") mapped to a temporary
// folder in which real VMDK bytes sit, so the simulator's /folder endpoint
// serves them.
//
// On top of the simulator's default inventory, New creates these VMs in DC0
// on host DC0_H0 and datastore vmstore (see the VM* constants):
//
//   - web01: BIOS, Debian guest, powered on, 2 vCPU / 2 GiB; a pvscsi and a
//     SATA controller; disks on scsi0:0 (64 MiB, thin), sata0:0 (32 MiB) and an
//     independent-persistent disk on scsi0:1 (16 MiB); vmxnet3 on "VM Network"
//     and e1000e on the distributed port group "DC0_DVPG0"; a snapshot tree
//     "base-install" → "pre-upgrade"; CBT off.
//   - win01: EFI with secure boot, Windows Server 2019 guest, powered off,
//     4 vCPU / 4 GiB; one 128 MiB disk on an NVMe controller, e1000e on
//     "VM Network"; CBT on with a change ID on its disk. Its
//     QueryChangedDiskAreas answers "*" (allocated areas) from the flat
//     file's real allocation (the simulator alone lacks the method).
//   - linked01: a linked clone: its disk is an ESXi seSparse delta
//     (linked01-000001.vmdk + -sesparse.vmdk, a real ESXi extent from the
//     shared samples) whose parent is golden/golden.vmdk (flat, 512 MiB).
//   - db01: BIOS, RHEL guest, an LSI Logic SAS boot disk and a raw device
//     mapping (physical mode), for the unsupported-disk warnings.
//
// Disk files are real: a VMFS descriptor plus a sparse -flat.vmdk with
// deterministic data at a few places, readable by qemu-img.
//
// Extending it (the CBT harness of the warm migration does this): Env.Wrap
// routes the SOAP calls on one object to a wrapper type that embeds the
// simulator's object and adds or replaces methods, while the simulator's own
// code keeps the original (so snapshots of a wrapped VM keep working, unlike
// a Map().Put of the wrapper):
//
//	env.Wrap(vmRef, &myVM{VirtualMachine: env.SimVM(vmRef)})
//
// where *myVM has, with the simulator's signature, e.g.
//
//	func (vm *myVM) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault
//
// Any managed object can be wrapped the same way (a test counts logins by
// wrapping the SessionManager). Wrappers are registered in the calling
// session's registry on its first call, so only SOAP dispatch and that
// session's property reads see them.
//
// Reads back for assertions should go through Env.Client (a govmomi client
// with its own session), never through the code under test.
package vmwaretest

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// Names of what New builds.
const (
	Datacenter  = "DC0"
	Datacenter2 = "DC1"
	Host        = "DC0_H0"
	Datastore   = "vmstore"
	Network1    = "VM Network"
	Network2    = "DC0_DVPG0"

	VMWeb    = "web01"
	VMWin    = "win01"
	VMLinked = "linked01"
	VMDB     = "db01"

	// WinChangeID is the change ID win01's disk reports.
	WinChangeID = "52 3c 3a 1b 7f 3f 47 1d-8e 3c 1a 2b 3c 4d 5e 6f/12"
)

// Default credentials of the simulator New starts.
const (
	User     = "administrator@vsphere.local"
	Password = "S3cr3t-pa55!"
)

// Env is a running simulator and what it holds.
type Env struct {
	Model  *simulator.Model
	Server *simulator.Server
	// URL is the SDK URL without credentials (https://127.0.0.1:PORT/sdk).
	URL *url.URL
	// Client is a separate, logged-in govmomi client for reading back.
	Client *govmomi.Client
	// Dir is the folder mapped as datastore "vmstore".
	Dir string
	// VMs maps the names above to their MoRefs.
	VMs map[string]types.ManagedObjectReference

	mu       sync.Mutex
	wrappers map[types.ManagedObjectReference]mo.Reference
}

// New starts the simulator with TLS (its self-signed certificate) and the
// inventory described in the package comment. Everything stops in t.Cleanup.
func New(t testing.TB) *Env {
	t.Helper()
	env, err := Start(context.Background(), t.TempDir())
	if err != nil {
		t.Fatalf("vmwaretest: %v", err)
	}
	t.Cleanup(env.Close)
	return env
}

// Start is New without a testing.TB: dir receives the datastore files.
// Close stops it.
func Start(ctx context.Context, dir string) (*Env, error) {
	m := simulator.VPX()
	m.Datacenter = 2
	m.Machine = 1
	if err := m.Create(); err != nil {
		return nil, fmt.Errorf("create model: %w", err)
	}
	env := &Env{Model: m, Dir: dir, VMs: map[string]types.ManagedObjectReference{}, wrappers: map[types.ManagedObjectReference]mo.Reference{}}
	m.Service.TLS = new(tls.Config)
	m.Service.Listen = &url.URL{User: url.UserPassword(User, Password)}
	m.Map().Handler = env.route
	env.Server = m.Service.NewServer()
	u := *env.Server.URL
	u.User = nil
	env.URL = &u

	cu := u
	cu.User = url.UserPassword(User, Password)
	c, err := govmomi.NewClient(ctx, &cu, true)
	if err != nil {
		env.Close()
		return nil, fmt.Errorf("connect to simulator: %w", err)
	}
	env.Client = c
	if err := env.build(ctx); err != nil {
		env.Close()
		return nil, err
	}
	return env, nil
}

// Close stops the server and removes the model's folders.
func (e *Env) Close() {
	if e.Client != nil {
		_ = e.Client.Logout(context.Background())
	}
	if e.Server != nil {
		e.Server.Close()
	}
	e.Model.Remove()
}

// Wrap makes SOAP calls on ref go to obj, a type embedding the simulator's
// object (see SimVM) that adds or replaces methods. The simulator's own code
// keeps seeing the original object, so its type assertions hold (snapshots
// of a wrapped VM work). A later Wrap of the same ref replaces the wrapper.
func (e *Env) Wrap(ref types.ManagedObjectReference, obj mo.Reference) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.wrappers[ref] = obj
}

// route runs before every SOAP call. The simulator dispatches through the
// caller's session registry first, so the wrapper is registered there: only
// SOAP dispatch and property reads see it, never the simulator's internals.
func (e *Env) route(ctx *simulator.Context, m *simulator.Method) (mo.Reference, types.BaseMethodFault) {
	e.mu.Lock()
	obj := e.wrappers[m.This]
	e.mu.Unlock()
	if obj == nil {
		return nil, nil
	}
	if ctx.Session != nil && ctx.Session.Registry.Get(m.This) != obj {
		ctx.Session.Put(obj)
	}
	return obj, nil
}

// SimVM returns the simulator's own object for a VM (for wrapping it).
func (e *Env) SimVM(ref types.ManagedObjectReference) *simulator.VirtualMachine {
	return e.Model.Map().Get(ref).(*simulator.VirtualMachine)
}

// Path returns the local file behind a path in datastore vmstore.
func (e *Env) Path(rel string) string { return filepath.Join(e.Dir, filepath.FromSlash(rel)) }

// Thumbprint is the SHA-1 thumbprint of the server certificate, as vSphere
// prints it (AA:BB:...).
func (e *Env) Thumbprint() string {
	return thumbprintSHA1(e.Server.Certificate().Raw)
}

func (e *Env) build(ctx context.Context) error {
	c := e.Client.Client
	finder := find.NewFinder(c, false)
	dc, err := finder.Datacenter(ctx, Datacenter)
	if err != nil {
		return err
	}
	finder.SetDatacenter(dc)
	host, err := finder.HostSystem(ctx, Host)
	if err != nil {
		return err
	}
	dss, err := host.ConfigManager().DatastoreSystem(ctx)
	if err != nil {
		return err
	}
	if _, err := dss.CreateLocalDatastore(ctx, Datastore, e.Dir); err != nil {
		return fmt.Errorf("create datastore %s on %s: %w", Datastore, e.Dir, err)
	}
	if err := e.writeDisks(); err != nil {
		return err
	}
	pool, err := host.ResourcePool(ctx)
	if err != nil {
		return err
	}
	folders, err := dc.Folders(ctx)
	if err != nil {
		return err
	}
	dvpg, err := finder.Network(ctx, Network2)
	if err != nil {
		return err
	}
	dvpgBacking, err := dvpg.EthernetCardBackingInfo(ctx)
	if err != nil {
		return err
	}
	for _, spec := range []vmSpec{e.web01(dvpgBacking), e.win01(), e.linked01(), e.db01()} {
		task, err := folders.VmFolder.CreateVM(ctx, spec.config, pool, host)
		if err != nil {
			return err
		}
		res, err := task.WaitForResult(ctx)
		if err != nil {
			return fmt.Errorf("create VM %s: %w", spec.config.Name, err)
		}
		ref := res.Result.(types.ManagedObjectReference)
		e.VMs[spec.config.Name] = ref
		vm := object.NewVirtualMachine(c, ref)
		for _, s := range spec.snapshots {
			task, err := vm.CreateSnapshot(ctx, s, "made by vmwaretest", false, false)
			if err != nil {
				return err
			}
			if err := task.Wait(ctx); err != nil {
				return fmt.Errorf("snapshot %s of %s: %w", s, spec.config.Name, err)
			}
		}
		if spec.powerOn {
			task, err := vm.PowerOn(ctx)
			if err != nil {
				return err
			}
			if err := task.Wait(ctx); err != nil {
				return fmt.Errorf("power on %s: %w", spec.config.Name, err)
			}
		}
	}
	win := e.VMs[VMWin]
	e.Wrap(win, &AllocatedAreasVM{VirtualMachine: e.SimVM(win), Env: e})
	return nil
}
