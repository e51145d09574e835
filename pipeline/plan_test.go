package pipeline_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
	"libvirt.org/go/libvirtxml"

	"github.com/vmdk2kvm/vmdk2kvm/pipeline"
	"github.com/vmdk2kvm/vmdk2kvm/vmware"
	"github.com/vmdk2kvm/vmdk2kvm/vmware/vmwaretest"
)

func planFor(t *testing.T, env *vmwaretest.Env, c *vmware.Client, name string, o pipeline.PlanOptions) *pipeline.Plan {
	t.Helper()
	ctx := context.Background()
	vm, err := c.FindVM(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	o.DomainType = "qemu"
	p, err := pipeline.PlanVSphere(ctx, c, vm, o)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// state is what a plan must not change, read with the property collector.
func state(t *testing.T, env *vmwaretest.Env, ref types.ManagedObjectReference) string {
	t.Helper()
	var m mo.VirtualMachine
	if err := property.DefaultCollector(env.Client.Client).RetrieveOne(context.Background(), ref, []string{"config.changeVersion", "config.changeTrackingEnabled", "config.extraConfig", "snapshot", "runtime.powerState"}, &m); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(m)
	return string(b)
}

func TestPlanVSphere(t *testing.T) {
	env := vmwaretest.New(t)
	ctx := context.Background()
	c, err := vmware.Connect(ctx, vmware.Config{URL: env.URL.String(), User: vmwaretest.User, Password: vmwaretest.Password, Thumbprint: env.Thumbprint()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	out := t.TempDir()
	before := map[string]string{}
	for n, r := range env.VMs {
		before[n] = state(t, env, r)
	}

	// win01: CBT on, powered off: the allocated size comes from CBT "*" and
	// equals the flat file's real allocation.
	win := planFor(t, env, c, vmwaretest.VMWin, pipeline.PlanOptions{OutputDir: out, Rate: 10 << 20})
	alloc, err := env.AllocatedBytes("win01/win01-flat.vmdk")
	if err != nil {
		t.Fatal(err)
	}
	d := win.Disks[0]
	if d.AllocatedSource != "cbt" || d.AllocatedBytes != alloc || d.CapacityBytes != vmwaretest.Win01Disk0 {
		t.Fatalf("win01 disk: %+v (file allocation %d)", d, alloc)
	}
	if want := float64(alloc) / float64(10<<20); d.EstimatedSeconds != want || win.Totals.EstimatedSeconds != want || win.Totals.CopyBytes != alloc {
		t.Fatalf("estimate %v / totals %+v, want %v", d.EstimatedSeconds, win.Totals, want)
	}
	if d.Target.File != filepath.Join(out, "win01-disk0.qcow2") || d.Target.Device != "vda" || d.Target.Boot != 1 {
		t.Fatalf("target %+v", d.Target)
	}
	if win.VM.OSFamily != "windows" || win.VM.Firmware != "efi" || !win.VM.SecureBoot || win.Domain.NVRAM == "" || !strings.Contains(win.Domain.Loader, "secboot") {
		t.Fatalf("win01: %+v %+v", win.VM, win.Domain)
	}
	if !hasFix(win, "windows", "virtio") || !hasWarning(win, "secure boot") {
		t.Fatalf("fixes %+v warnings %q", win.Fixes, win.Warnings)
	}

	// web01: running, CBT off, two snapshots, an independent disk.
	web := planFor(t, env, c, vmwaretest.VMWeb, pipeline.PlanOptions{OutputDir: out})
	if len(web.Disks) != 3 || web.VM.Snapshots != 2 || web.VM.CBT || web.VM.PowerState != "poweredOn" {
		t.Fatalf("web01: %+v", web.VM)
	}
	for i, want := range []int64{vmwaretest.Web01Disk0, vmwaretest.Web01Disk1, vmwaretest.Web01Disk2} {
		if d := web.Disks[i]; d.CapacityBytes != want || d.AllocatedBytes != want || d.AllocatedSource != "capacity" || d.Source.Method != "https" || !d.Source.Pinned {
			t.Fatalf("web01 disk %d: %+v", i, d)
		}
	}
	if web.Rate != pipeline.DefaultRate || web.Totals.CapacityBytes != vmwaretest.Web01Disk0+vmwaretest.Web01Disk1+vmwaretest.Web01Disk2 {
		t.Fatalf("totals %+v", web.Totals)
	}
	for _, w := range []string{"CBT is off", "2 snapshot(s)", "independent disk", "running"} {
		if !hasWarning(web, w) {
			t.Errorf("web01: no warning %q in %q", w, web.Warnings)
		}
	}
	if !hasFix(web, "linux", "fstab") || !hasFix(web, "linux", "initramfs") {
		t.Errorf("web01 fixes %+v", web.Fixes)
	}
	// MACs and networks in the domain are the simulator's.
	if len(web.Domain.NICs) != 2 || web.Domain.NICs[0].MAC != vmwaretest.Web01MAC0 || web.Domain.NICs[1].From != vmwaretest.Network2 {
		t.Errorf("nics %+v", web.Domain.NICs)
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(web.Domain.XML); err != nil || len(dom.Devices.Disks) != 3 || dom.Devices.Disks[0].Source.File.File != web.Disks[0].Target.File {
		t.Fatalf("domain XML: %v", err)
	}

	// At a snapshot: read there, not pinned.
	snap := planFor(t, env, c, vmwaretest.VMWeb, pipeline.PlanOptions{OutputDir: out, Snapshot: "base-install"})
	if snap.SnapshotName != "base-install" || snap.Snapshot == "" || snap.Disks[0].Source.Pinned || snap.Disks[0].Source.Snapshot != snap.Snapshot {
		t.Fatalf("at snapshot: %s %s %+v", snap.SnapshotName, snap.Snapshot, snap.Disks[0].Source)
	}

	// db01: the RDM is skipped, with the reason.
	db := planFor(t, env, c, vmwaretest.VMDB, pipeline.PlanOptions{OutputDir: out})
	if db.Disks[1].Skip == "" || db.Disks[1].Target.File != "" || db.Totals.CapacityBytes != vmwaretest.DB01Disk0 || !hasWarning(db, "raw device mapping") {
		t.Fatalf("db01: %+v %+v", db.Disks[1], db.Totals)
	}

	// The plan changed nothing.
	for n, r := range env.VMs {
		if after := state(t, env, r); after != before[n] {
			t.Errorf("%s changed:\n%s\n%s", n, before[n], after)
		}
	}

	// Round trips through JSON and YAML.
	for _, p := range []*pipeline.Plan{win, web, db} {
		for _, kind := range []string{"json", "yaml"} {
			var buf bytes.Buffer
			var err error
			if kind == "json" {
				err = p.WriteJSON(&buf)
			} else {
				err = p.WriteYAML(&buf)
			}
			if err != nil {
				t.Fatal(err)
			}
			file := filepath.Join(t.TempDir(), "plan."+kind)
			os.WriteFile(file, buf.Bytes(), 0o644)
			back, err := pipeline.LoadPlan(file)
			if err != nil {
				t.Fatalf("%s: %v", kind, err)
			}
			if !reflect.DeepEqual(back, p) {
				a, _ := json.Marshal(p)
				b, _ := json.Marshal(back)
				t.Fatalf("%s round trip differs:\n%s\n%s", kind, a, b)
			}
		}
	}

	// Readable in one screen.
	var text bytes.Buffer
	if err := web.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(text.String()), "\n")
	if len(lines) > 40 {
		t.Errorf("plan text has %d lines:\n%s", len(lines), text.String())
	}
	for _, s := range []string{"scsi0:0", "sata0:0", "scsi0:1", web.Disks[0].Target.File, vmwaretest.Web01MAC1, "CBT is off"} {
		if !strings.Contains(text.String(), s) {
			t.Errorf("plan text lacks %q:\n%s", s, text.String())
		}
	}
	t.Logf("plan text:\n%s", text.String())
}

func hasWarning(p *pipeline.Plan, s string) bool {
	for _, w := range p.Warnings {
		if strings.Contains(w, s) {
			return true
		}
	}
	return false
}

func hasFix(p *pipeline.Plan, fixer, s string) bool {
	for _, f := range p.Fixes {
		if f.Fixer == fixer && strings.Contains(f.Action, s) {
			return true
		}
	}
	return false
}

func TestLoadPlanRefusals(t *testing.T) {
	good := `{"version":1,"server":"vc","vm":{"moref":"vm-1"},"rate_bytes_per_second":1,
	"disks":[{"key":1,"capacity_bytes":10,"allocated_bytes":5,"target":{"file":"a.qcow2"}},
	         {"key":2,"capacity_bytes":10,"allocated_bytes":5,"target":{"file":"b.qcow2"}}]}`
	if _, err := pipeline.ParsePlan([]byte(good)); err != nil {
		t.Fatal(err)
	}
	for want, bad := range map[string]string{
		"version 2":             strings.Replace(good, `"version":1`, `"version":2`, 1),
		"also the target":       strings.Replace(good, "b.qcow2", "a.qcow2", 1),
		"allocated_bytes 50":    strings.Replace(good, `"allocated_bytes":5,"target":{"file":"a`, `"allocated_bytes":50,"target":{"file":"a`, 1),
		"unknown field":         strings.Replace(good, `"server"`, `"sever":"x","server"`, 1),
		"target.file is empty":  strings.Replace(good, "a.qcow2", "", 1),
		"empty":                 "  ",
		"neither JSON nor YAML": "version: [1",
	} {
		_, err := pipeline.ParsePlan([]byte(bad))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: got %v", want, err)
		}
	}
	if _, err := pipeline.LoadPlan(filepath.Join(t.TempDir(), "none.json")); err == nil || !strings.Contains(err.Error(), "none.json") {
		t.Errorf("missing file: %v", err)
	}
}
