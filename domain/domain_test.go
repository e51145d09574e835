package domain_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
	"libvirt.org/go/libvirtxml"

	"github.com/vmdk2kvm/vmdk2kvm/domain"
	"github.com/vmdk2kvm/vmdk2kvm/vmware"
	"github.com/vmdk2kvm/vmdk2kvm/vmware/vmwaretest"
)

// vmInfo reads a VM from the simulator with our code (the input of Build),
// and the raw managed object with the property collector (the oracle).
func vmInfo(t *testing.T, env *vmwaretest.Env, name string) (*vmware.VMInfo, mo.VirtualMachine) {
	t.Helper()
	ctx := context.Background()
	c, err := vmware.Connect(ctx, vmware.Config{URL: env.URL.String(), User: vmwaretest.User, Password: vmwaretest.Password, Thumbprint: env.Thumbprint()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	vm, err := c.FindVM(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	var m mo.VirtualMachine
	if err := property.DefaultCollector(env.Client.Client).RetrieveOne(ctx, env.VMs[name], []string{"config"}, &m); err != nil {
		t.Fatal(err)
	}
	return info, m
}

// libvirtd starts a private, unprivileged libvirtd (session mode, as user
// nobody, all its state in a temporary folder) and returns its URI. It never
// touches the system daemon nor other tests' daemons.
func libvirtd(t *testing.T) string {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("the libvirt test needs root to start libvirtd as another user")
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)
	dir, err := os.MkdirTemp("", "vmdk2kvm-libvirtd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, d := range []string{dir, dir + "/run"} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(d, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	cmd := exec.CommandContext(ctx, "libvirtd", "--timeout", "120")
	cmd.Dir = dir
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + dir, "XDG_RUNTIME_DIR=" + dir + "/run",
		"XDG_CONFIG_HOME=" + dir + "/config", "XDG_CACHE_HOME=" + dir + "/cache", "LIBVIRT_LOG_OUTPUTS=1:file:" + dir + "/libvirtd.log"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start libvirtd: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		cancel()
	})
	uri := "qemu:///session?socket=" + dir + "/run/libvirt/libvirt-sock"
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if err := exec.Command("virsh", "-c", uri, "version").Run(); err == nil {
			return uri
		}
		select {
		case <-done:
			log, _ := os.ReadFile(dir + "/libvirtd.log")
			t.Fatalf("libvirtd exited:\n%s", log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("libvirtd did not answer within 60 s")
		}
	}
}

func virsh(t *testing.T, uri string, args ...string) string {
	t.Helper()
	out, err := exec.Command("virsh", append([]string{"-c", uri}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("virsh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestDomainXML builds the domains of a BIOS and an EFI (secure boot) VM,
// validates them with virt-xml-validate, defines them in a real libvirtd and
// checks what `virsh dumpxml` returns against the simulator's VM.
func TestDomainXML(t *testing.T) {
	env := vmwaretest.New(t)
	uri := libvirtd(t)
	dir := t.TempDir()
	for _, tc := range []struct {
		vm   string
		sata bool
	}{{vmwaretest.VMWeb, false}, {vmwaretest.VMWin, false}, {vmwaretest.VMWeb, true}} {
		t.Run(fmt.Sprintf("%s-sata=%v", tc.vm, tc.sata), func(t *testing.T) {
			info, m := vmInfo(t, env, tc.vm)
			name := fmt.Sprintf("vmdk2kvm-test-%s-%v", tc.vm, tc.sata)
			res, err := domain.Build(info, domain.Options{
				Name: name, Type: "qemu", Dir: dir, SATA: tc.sata,
				NetworkMap: map[string]string{vmwaretest.Network1: "lan", vmwaretest.Network2: "dmz"},
			})
			if err != nil {
				t.Fatal(err)
			}
			xml, err := res.Domain.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			file := filepath.Join(dir, name+".xml")
			if err := os.WriteFile(file, []byte(xml), 0o644); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("virt-xml-validate", file, "domain").CombinedOutput(); err != nil {
				t.Fatalf("virt-xml-validate: %v\n%s\n%s", err, out, xml)
			}
			virsh(t, uri, "define", file)
			t.Cleanup(func() { exec.Command("virsh", "-c", uri, "undefine", name, "--nvram").Run() })
			var back libvirtxml.Domain
			if err := back.Unmarshal(virsh(t, uri, "dumpxml", name)); err != nil {
				t.Fatal(err)
			}
			check(t, &back, m, info, tc.sata, dir, name)
		})
	}
}

func check(t *testing.T, d *libvirtxml.Domain, m mo.VirtualMachine, info *vmware.VMInfo, sata bool, dir, name string) {
	t.Helper()
	cfg := m.Config
	if d.Type != "qemu" || d.OS.Type.Machine == "" || !strings.Contains(d.OS.Type.Machine, "q35") {
		t.Errorf("type %s machine %s", d.Type, d.OS.Type.Machine)
	}
	if d.UUID != cfg.Uuid {
		t.Errorf("uuid %s, want %s", d.UUID, cfg.Uuid)
	}
	if d.VCPU.Value != uint(cfg.Hardware.NumCPU) || d.Memory.Value*1024 != uint(cfg.Hardware.MemoryMB)*1024*1024 && d.Memory.Value != uint(cfg.Hardware.MemoryMB)*1024 {
		t.Errorf("cpus %d memory %d %s; want %d CPUs, %d MiB", d.VCPU.Value, d.Memory.Value, d.Memory.Unit, cfg.Hardware.NumCPU, cfg.Hardware.MemoryMB)
	}
	if cps := cfg.Hardware.NumCoresPerSocket; cps != nil && d.CPU.Topology.Cores != int(*cps) {
		t.Errorf("cores %d, want %d", d.CPU.Topology.Cores, *cps)
	}
	// Firmware.
	if cfg.Firmware == "efi" {
		if d.OS.Loader == nil || d.OS.NVRam == nil || d.OS.NVRam.NVRam == "" || !strings.Contains(d.OS.NVRam.NVRam, name) {
			t.Fatalf("efi: loader %+v nvram %+v", d.OS.Loader, d.OS.NVRam)
		}
		sb := cfg.BootOptions != nil && cfg.BootOptions.EfiSecureBootEnabled != nil && *cfg.BootOptions.EfiSecureBootEnabled
		if sb != (d.OS.Loader.Secure == "yes") || sb != (d.Features.SMM != nil && d.Features.SMM.State == "on") {
			t.Errorf("secure boot %v: loader %+v smm %+v", sb, d.OS.Loader, d.Features.SMM)
		}
		if sb && d.OS.Loader.Path != domain.OVMFSecureCode {
			t.Errorf("loader %s", d.OS.Loader.Path)
		}
	} else if d.OS.Loader != nil || d.OS.NVRam != nil {
		t.Errorf("BIOS VM got a loader %+v", d.OS.Loader)
	}
	// NICs: the original MACs, in order, on the mapped networks.
	var want []string
	for _, dev := range cfg.Hardware.Device {
		if n, ok := dev.(types.BaseVirtualEthernetCard); ok {
			want = append(want, strings.ToLower(n.GetVirtualEthernetCard().MacAddress))
		}
	}
	if len(d.Devices.Interfaces) != len(want) {
		t.Fatalf("%d interfaces, want %d", len(d.Devices.Interfaces), len(want))
	}
	for i, iface := range d.Devices.Interfaces {
		if iface.MAC.Address != want[i] || iface.Model.Type != "virtio" {
			t.Errorf("nic %d: %s %s, want %s virtio", i, iface.MAC.Address, iface.Model.Type, want[i])
		}
		net := iface.Source.Network.Network
		if wantNet := map[string]string{vmwaretest.Network1: "lan", vmwaretest.Network2: "dmz"}[info.NICs[i].Network]; net != wantNet {
			t.Errorf("nic %d on %s, want %s", i, net, wantNet)
		}
	}
	// Disks: every VMware disk, the configured boot disk first with boot order 1.
	var disks []*types.VirtualDisk
	for _, dev := range cfg.Hardware.Device {
		if vd, ok := dev.(*types.VirtualDisk); ok {
			disks = append(disks, vd)
		}
	}
	if len(d.Devices.Disks) != len(disks) {
		t.Fatalf("%d disks, want %d", len(d.Devices.Disks), len(disks))
	}
	first := disks[0].Key
	if bo := cfg.BootOptions; bo != nil && len(bo.BootOrder) > 0 {
		first = bo.BootOrder[0].(*types.VirtualMachineBootOptionsBootableDiskDevice).DeviceKey
	}
	firstIdx := 0
	for i, vd := range disks {
		if vd.Key == first {
			firstIdx = i
		}
	}
	bus, prefix := "virtio", "vd"
	if sata {
		bus, prefix = "sata", "sd"
	}
	for i, dd := range d.Devices.Disks {
		if dd.Target.Bus != bus || dd.Target.Dev != prefix+string(rune('a'+i)) || dd.Driver.Type != "qcow2" || dd.Boot == nil || dd.Boot.Order != uint(i+1) {
			t.Errorf("disk %d: %+v %+v %+v", i, dd.Target, dd.Driver, dd.Boot)
		}
		if !strings.HasPrefix(dd.Source.File.File, dir) {
			t.Errorf("disk %d file %s", i, dd.Source.File.File)
		}
	}
	if !strings.Contains(d.Devices.Disks[0].Source.File.File, fmt.Sprintf("-disk%d.", firstIdx)) {
		t.Errorf("first disk %s is not VMware disk #%d (key %d)", d.Devices.Disks[0].Source.File.File, firstIdx, first)
	}
	// Serial console and guest agent channel.
	if len(d.Devices.Serials) != 1 || len(d.Devices.Consoles) != 1 {
		t.Errorf("serial %d console %d", len(d.Devices.Serials), len(d.Devices.Consoles))
	}
	agent := false
	for _, c := range d.Devices.Channels {
		if c.Target != nil && c.Target.VirtIO != nil && c.Target.VirtIO.Name == "org.qemu.guest_agent.0" {
			agent = true
		}
	}
	if !agent {
		t.Error("no guest agent channel")
	}
	if d.Features == nil || d.Features.ACPI == nil {
		t.Error("no ACPI")
	}
}

func TestBuildRules(t *testing.T) {
	info := &vmware.VMInfo{Name: "x", UUID: "4213a1b2-0001-4c3d-9e8f-aabbccddee01", CPUs: 6, CoresPerSocket: 4, MemoryMiB: 512, Firmware: "bios", GuestID: "otherLinux64Guest",
		Disks:     []vmware.Disk{{Key: 1, Address: "scsi0:0"}, {Key: 2, Address: "scsi0:1", Provisioning: "rdm-physical"}, {Key: 3, Address: "sata0:0"}},
		NICs:      []vmware.NIC{{MAC: "00:50:56:AA:00:09", Network: "unmapped", Connected: false}},
		BootOrder: []int32{3}}
	res, err := domain.Build(info, domain.Options{Type: "qemu", DiskPaths: map[int32]string{1: "/d/one.qcow2"}})
	if err != nil {
		t.Fatal(err)
	}
	d := res.Domain
	// 6 CPUs with 4 cores per socket do not divide: one core per socket.
	if tp := d.CPU.Topology; tp.Sockets != 6 || tp.Cores != 1 {
		t.Errorf("topology %+v", tp)
	}
	if len(res.Disks) != 2 || res.Disks[0].Key != 3 || res.Disks[1].File != "/d/one.qcow2" || res.Disks[1].Target != "vdb" {
		t.Errorf("disks %+v", res.Disks)
	}
	if len(res.Warnings) != 2 || d.Devices.Interfaces[0].Source.Network.Network != "default" || d.Devices.Interfaces[0].Link.State != "down" ||
		d.Devices.Interfaces[0].MAC.Address != "00:50:56:aa:00:09" {
		t.Errorf("warnings %q, nic %+v", res.Warnings, d.Devices.Interfaces[0])
	}
	for _, bad := range []*vmware.VMInfo{
		{Name: "a/b", CPUs: 1, MemoryMiB: 1, Disks: info.Disks},
		{Name: "x", CPUs: 0, MemoryMiB: 1, Disks: info.Disks},
		{Name: "x", CPUs: 1, MemoryMiB: 1, Firmware: "coreboot", Disks: info.Disks},
		{Name: "x", CPUs: 1, MemoryMiB: 1, Disks: []vmware.Disk{{Key: 2, Provisioning: "rdm-physical"}}},
	} {
		if _, err := domain.Build(bad, domain.Options{Type: "qemu"}); err == nil {
			t.Errorf("%+v: accepted", bad)
		}
	}
	if _, err := domain.ParseNetworkMap([]string{"a=b", "noequal"}); err == nil {
		t.Error("bad network map accepted")
	}
	if got := domain.ProbeType(); got != "kvm" && got != "qemu" {
		t.Errorf("probe %q", got)
	}
}
