package vmwaretest

import (
	"context"
	"os/exec"
	"strings"
	"testing"

	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
)

// TestInventory checks that the VMs exist as described and that their disk
// files are real VMDKs that qemu-img opens (the linked clone as a chain).
func TestInventory(t *testing.T) {
	env := New(t)
	ctx := context.Background()
	pc := property.DefaultCollector(env.Client.Client)
	for _, name := range []string{VMWeb, VMWin, VMLinked, VMDB} {
		var vm mo.VirtualMachine
		if err := pc.RetrieveOne(ctx, env.VMs[name], []string{"name", "config", "layoutEx"}, &vm); err != nil {
			t.Fatal(err)
		}
		if vm.Name != name {
			t.Fatalf("name %q, want %q", vm.Name, name)
		}
	}
	for _, f := range []string{"web01/web01.vmdk", "win01/win01.vmdk", "linked01/linked01-000001.vmdk"} {
		out, err := exec.Command("qemu-img", "info", "--backing-chain", env.Path(f)).CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-img info %s: %v\n%s", f, err, out)
		}
		if f == "linked01/linked01-000001.vmdk" && !strings.Contains(string(out), "golden.vmdk") {
			t.Fatalf("linked clone has no parent:\n%s", out)
		}
	}
}
