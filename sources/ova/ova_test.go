package ova_test

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/internal/testpeers"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
	httpsrc "github.com/vmdk2kvm/vmdk2kvm/sources/http"
	"github.com/vmdk2kvm/vmdk2kvm/sources/ova"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
	sshsrc "github.com/vmdk2kvm/vmdk2kvm/sources/ssh"
	"github.com/vmdk2kvm/vmdk2kvm/sources/vmdk"
)

// The OVF lists the data disk first in DiskSection, but the boot disk sits
// on SCSI unit 0 and the data disk on unit 1: the VM order is boot, data.
const ovfTemplate = `<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="vm-disk2.vmdk" ovf:id="file2" ovf:size="%d"/>
    <File ovf:href="vm-disk1.vmdk" ovf:id="file1" ovf:size="%d"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="3" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="1048576"/>
    <Disk ovf:capacity="6" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="3145728"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network"><Description>The VM Network network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="testvm">
    <Info>A virtual machine</Info>
    <Name>testvm</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian11_64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian GNU/Linux 11 (64-bit)</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName><vssd:InstanceID>0</vssd:InstanceID><vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType></System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>4 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>4</rasd:VirtualQuantity>
        <vmw:CoresPerSocket ovf:required="false">2</vmw:CoresPerSocket>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>2048MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>1</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 2</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>00:50:56:aa:bb:cc</rasd:Address>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Connection>Backup</rasd:Connection>
        <rasd:ElementName>Network adapter 2</rasd:ElementName>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
      <vmw:Config ovf:required="false" vmw:key="uefi.secureBoot.enabled" vmw:value="true"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
`

type pkg struct {
	dir     string // holds vm.ova
	oracle1 string // qemu-img raw of the boot disk
	oracle2 string
}

func run(t *testing.T, dir string, args ...string) {
	t.Helper()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// build makes an OVA with tar: OVF first, then the manifest, then two
// streamOptimized disks made by qemu-img. alg is SHA1 or SHA256;
// tamper(name, data) may change a member after the manifest was written.
func build(t *testing.T, alg string, tamper func(name string, b []byte) []byte) pkg {
	work, out := t.TempDir(), t.TempDir()
	p := pkg{dir: out, oracle1: filepath.Join(work, "d1.raw"), oracle2: filepath.Join(work, "d2.raw")}
	run(t, work, "qemu-img", "create", "-q", "-f", "raw", "src1.raw", "6M")
	run(t, work, "qemu-io", "-f", "raw", "-c", "write -P 0xa1 0 1M", "-c", "write -P 0xa2 4M 1M", "src1.raw")
	run(t, work, "qemu-img", "create", "-q", "-f", "raw", "src2.raw", "3M")
	run(t, work, "qemu-io", "-f", "raw", "-c", "write -P 0xb1 1M 1M", "src2.raw")
	run(t, work, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "src1.raw", "vm-disk1.vmdk")
	run(t, work, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "src2.raw", "vm-disk2.vmdk")
	run(t, work, "qemu-img", "convert", "-O", "raw", "vm-disk1.vmdk", p.oracle1)
	run(t, work, "qemu-img", "convert", "-O", "raw", "vm-disk2.vmdk", p.oracle2)
	st1, _ := os.Stat(filepath.Join(work, "vm-disk1.vmdk"))
	st2, _ := os.Stat(filepath.Join(work, "vm-disk2.vmdk"))
	ovf := fmt.Sprintf(ovfTemplate, st2.Size(), st1.Size())
	os.WriteFile(filepath.Join(work, "vm.ovf"), []byte(ovf), 0o644)
	var mf strings.Builder
	for _, n := range []string{"vm.ovf", "vm-disk1.vmdk", "vm-disk2.vmdk"} {
		b, err := os.ReadFile(filepath.Join(work, n))
		if err != nil {
			t.Fatal(err)
		}
		if alg == "SHA1" {
			fmt.Fprintf(&mf, "SHA1(%s)= %x\n", n, sha1.Sum(b))
		} else {
			fmt.Fprintf(&mf, "SHA256(%s)= %x\n", n, sha256.Sum256(b))
		}
		if tamper != nil {
			os.WriteFile(filepath.Join(work, n), tamper(n, b), 0o644)
		}
	}
	os.WriteFile(filepath.Join(work, "vm.mf"), []byte(mf.String()), 0o644)
	run(t, work, "tar", "-cf", filepath.Join(out, "vm.ova"), "vm.ovf", "vm.mf", "vm-disk1.vmdk", "vm-disk2.vmdk")
	return p
}

func registry(tr sources.Transport) *sources.Registry {
	r := sources.NewRegistry().AddTransport(tr)
	return r.AddFormat(ova.Format{Disks: r}).AddFormat(vmdk.Format{}).AddFormat(raw.Format{})
}

func check(t *testing.T, reg *sources.Registry, loc string, p pkg) {
	t.Helper()
	img, err := reg.Open(context.Background(), loc, sources.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Info.Format != "ova/vmdk" {
		t.Fatalf("format %q", img.Info.Format)
	}
	testpeers.SameAsRaw(t, img, p.oracle1) // the boot disk comes first
	pk := ova.PackageOf(img)
	vm := pk.VM
	if vm.Name != "testvm" || vm.CPUs != 4 || vm.CoresPerSocket != 2 || vm.MemoryBytes != 2<<30 ||
		vm.Firmware != "efi" || !vm.SecureBoot || vm.OSType != "debian11_64Guest" {
		t.Fatalf("VM %+v", vm)
	}
	if len(vm.Disks) != 2 || vm.Disks[0].File != "vm-disk1.vmdk" || vm.Disks[0].Capacity != 6<<20 || vm.Disks[0].Unit != 0 ||
		vm.Disks[1].File != "vm-disk2.vmdk" || vm.Disks[1].Capacity != 3<<20 || vm.Disks[0].Controller != "scsi" {
		t.Fatalf("disks %+v", vm.Disks)
	}
	if len(vm.NICs) != 2 || vm.NICs[0].Model != "VmxNet3" || vm.NICs[0].Network != "VM Network" || vm.NICs[0].MAC != "00:50:56:aa:bb:cc" || vm.NICs[1].Model != "E1000" {
		t.Fatalf("NICs %+v", vm.NICs)
	}
	if len(pk.Verified) != 3 {
		t.Fatalf("verified %v", pk.Verified)
	}
	d2, err := pk.OpenDisk(context.Background(), reg, 1, sources.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	testpeers.SameAsRaw(t, d2, p.oracle2)
}

func TestLocal(t *testing.T) {
	for _, alg := range []string{"SHA256", "SHA1"} {
		t.Run(alg, func(t *testing.T) {
			p := build(t, alg, nil)
			check(t, registry(file.Transport{}), filepath.Join(p.dir, "vm.ova"), p)
		})
	}
}

func TestOverHTTP(t *testing.T) {
	p := build(t, "SHA256", nil)
	sim := testpeers.StartVCSim(t, p.dir)
	tr := httpsrc.New(httpsrc.Config{Thumbprint: sim.Thumbprint, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	check(t, registry(tr), sim.FolderURL("vm.ova"), p)
	// Only the headers, the OVF, the manifest check's reads and the disks'
	// grains were fetched: about one pass over the archive, not several.
	st, _ := os.Stat(filepath.Join(p.dir, "vm.ova"))
	if got := tr.Stats().BytesFetched; got > 4*st.Size() {
		t.Fatalf("fetched %d bytes for a %d-byte OVA", got, st.Size())
	}
}

func TestTampered(t *testing.T) {
	// A disk changed after the manifest was written.
	p := build(t, "SHA256", func(name string, b []byte) []byte {
		if name == "vm-disk2.vmdk" {
			b[len(b)/2] ^= 0xff
		}
		return b
	})
	_, err := registry(file.Transport{}).Open(context.Background(), filepath.Join(p.dir, "vm.ova"), sources.Options{})
	if err == nil || !strings.Contains(err.Error(), "vm-disk2.vmdk") || !strings.Contains(err.Error(), "refusing") {
		t.Fatalf("tampered disk: %v", err)
	}
	// A changed OVF (more memory) is refused too.
	p = build(t, "SHA1", func(name string, b []byte) []byte {
		if name == "vm.ovf" {
			return []byte(strings.Replace(string(b), ">2048<", ">4096<", 1))
		}
		return b
	})
	_, err = registry(file.Transport{}).Open(context.Background(), filepath.Join(p.dir, "vm.ova"), sources.Options{})
	if err == nil || !strings.Contains(err.Error(), "vm.ovf") || !strings.Contains(err.Error(), "manifest") {
		t.Fatalf("tampered OVF: %v", err)
	}
}

func TestNotAnOVA(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "a.txt"), []byte("hello"), 0o644)
	run(t, dir, "tar", "-cf", "x.tar", "a.txt")
	img, err := registry(file.Transport{}).Open(context.Background(), filepath.Join(dir, "x.tar"), sources.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Info.Format != "raw" {
		t.Fatalf("a plain tar probed as %s", img.Info.Format)
	}
	_, err = registry(file.Transport{}).Open(context.Background(), filepath.Join(dir, "x.tar"), sources.Options{Format: "ova"})
	if err == nil || !strings.Contains(err.Error(), "no .ovf") {
		t.Fatalf("forced ova on a plain tar: %v", err)
	}
}

func TestOverSSH(t *testing.T) {
	p := build(t, "SHA256", nil)
	sshd := testpeers.StartSSHD(t, testpeers.SSHDOptions{})
	tr := sshsrc.New(sshsrc.Config{KeyFiles: []string{sshd.KeyFile}, KnownHosts: []string{sshd.KnownHosts}, AgentSocket: "none",
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	check(t, registry(tr), fmt.Sprintf("ssh://%s@%s%s", sshd.User, sshd.Addr, filepath.Join(p.dir, "vm.ova")), p)
}
