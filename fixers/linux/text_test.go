package linux

import (
	"strings"
	"testing"

	pb "github.com/vmdk2kvm/vmdk2kvm/plugins/proto"
)

func testResolver() *resolver {
	return newResolver(&pb.Inspection{
		OsType: "linux", Root: "/dev/sda2", Disks: []string{"/dev/sda", "/dev/sdb"},
		Filesystems: []*pb.Filesystem{
			{Device: "/dev/sda1", Type: "ext4", Uuid: "boot-uuid", Mountpoint: "/boot"},
			{Device: "/dev/sda2", Type: "xfs", Uuid: "root-uuid", Mountpoint: "/"},
			{Device: "/dev/sda3", Type: "swap", Uuid: "swap-uuid"},
			{Device: "/dev/sdb1", Type: "ext4", Label: "data"},
			{Device: "/dev/sdb2", Type: "crypto_LUKS", Uuid: "luks-uuid"},
		},
	})
}

func TestFixFstab(t *testing.T) {
	in := "# comment /dev/sda1\n" +
		"/dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0-part2 /     xfs  defaults 0 1\n" +
		"/dev/sda1\t/boot\text4\tdefaults\t0 2\n" +
		"/dev/disk/by-id/wwn-0x5000-part3 none swap sw 0 0\n" +
		"/dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:1:0-part1 /data ext4 defaults 0 2\n" +
		"UUID=already /x ext4 defaults 0 2\n" +
		"/dev/mapper/vg-lv /y ext4 defaults 0 2\n" +
		"/dev/sdc1 /z ext4 defaults 0 2\n"
	out, did, warn := fixTab(in, 0, 1, testResolver())
	want := "# comment /dev/sda1\n" +
		"UUID=root-uuid /     xfs  defaults 0 1\n" +
		"UUID=boot-uuid\t/boot\text4\tdefaults\t0 2\n" +
		"/dev/disk/by-id/wwn-0x5000-part3 none swap sw 0 0\n" + // by-id with two disks: ambiguous
		"LABEL=data /data ext4 defaults 0 2\n" +
		"UUID=already /x ext4 defaults 0 2\n" +
		"/dev/mapper/vg-lv /y ext4 defaults 0 2\n" +
		"/dev/sdc1 /z ext4 defaults 0 2\n"
	if out != want {
		t.Fatalf("got\n%s\nwant\n%s", out, want)
	}
	if len(did) != 3 || len(warn) != 2 {
		t.Fatalf("did %q warn %q", did, warn)
	}
	// Idempotent.
	out2, did2, _ := fixTab(out, 0, 1, testResolver())
	if out2 != out || len(did2) != 0 {
		t.Fatalf("second pass changed %q", did2)
	}
}

func TestFixCrypttab(t *testing.T) {
	out, did, _ := fixTab("cr_data /dev/sdb2 none luks\n", 1, -1, testResolver())
	if out != "cr_data UUID=luks-uuid none luks\n" || len(did) != 1 {
		t.Fatalf("got %q", out)
	}
}

func TestFixCmdline(t *testing.T) {
	r := testResolver()
	ext := "LABEL l\n  KERNEL /vmlinuz\n  APPEND root=/dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0-part2 ro resume=/dev/sda3 quiet\n"
	out, did, warn := fixCmdline(ext, extlinuxLine, r, "ttyS0")
	want := "LABEL l\n  KERNEL /vmlinuz\n  APPEND root=UUID=root-uuid ro resume=UUID=swap-uuid quiet console=ttyS0\n"
	if out != want || len(did) != 3 || len(warn) != 0 {
		t.Fatalf("got %q did %q warn %q", out, did, warn)
	}
	if again, did, _ := fixCmdline(out, extlinuxLine, r, "ttyS0"); again != out || len(did) != 0 {
		t.Fatalf("not idempotent: %q %q", again, did)
	}
	grub := "GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"root=/dev/sda2 net.ifnames=1\"\n"
	out, _, _ = fixCmdline(grub, grubDefaultLine, r, "")
	if !strings.Contains(out, `GRUB_CMDLINE_LINUX="root=UUID=root-uuid net.ifnames=1"`) {
		t.Fatalf("grub: %q", out)
	}
	out, did = grubConsole(out, "ttyS0", nil)
	if !strings.Contains(out, `GRUB_CMDLINE_LINUX="root=UUID=root-uuid net.ifnames=1 console=ttyS0"`) || len(did) != 1 {
		t.Fatalf("grub console: %q", out)
	}
	cfg := "menuentry 'Debian' {\n\tlinux\t/vmlinuz-6.1 root=/dev/sda2 ro quiet\n\tinitrd\t/initrd.img-6.1\n}\n"
	out, _, _ = fixCmdline(cfg, grubCfgLine, r, "")
	if !strings.Contains(out, "\tlinux\t/vmlinuz-6.1 root=UUID=root-uuid ro quiet\n") {
		t.Fatalf("grub.cfg: %q", out)
	}
	bls := "title RHEL\nlinux /vmlinuz\noptions root=/dev/disk/by-path/pci-0000:03:00.0-scsi-0:0:0:0-part2 ro\n"
	out, _, _ = fixCmdline(bls, blsLine, r, "")
	if !strings.Contains(out, "options root=UUID=root-uuid ro\n") {
		t.Fatalf("bls: %q", out)
	}
}

func TestAddModules(t *testing.T) {
	out, added := addModuleLines("# mods\nvmw_pvscsi\nvirtio_blk\n")
	if strings.Join(added, ",") != "virtio_pci,virtio_scsi,virtio_net" || !strings.HasSuffix(out, "virtio_pci\nvirtio_scsi\nvirtio_net\n") {
		t.Fatalf("%q %q", out, added)
	}
	if again, add := addModuleLines(out); again != out || add != nil {
		t.Fatal("not idempotent")
	}
	s, add := addInitrdModules("FOO=1\nINITRD_MODULES=\"mptspi ata_piix\"\n")
	if s != "FOO=1\nINITRD_MODULES=\"mptspi ata_piix virtio_pci virtio_blk virtio_scsi virtio_net\"\n" || len(add) != 4 {
		t.Fatalf("%q", s)
	}
}

func TestNetplan(t *testing.T) {
	in := `network:
  version: 2
  ethernets:
    ens192:
      match:
        macaddress: "00:50:56:aa:bb:cc"
      set-name: ens192
      addresses: [10.0.0.5/24]
      dhcp4: false
`
	out, gone := fixNetplan(in)
	want := `network:
  version: 2
  ethernets:
    ens192:
      addresses: [10.0.0.5/24]
      dhcp4: false
`
	if out != want || len(gone) != 3 {
		t.Fatalf("got\n%s\ngone %q", out, gone)
	}
	if names := netplanNames(in); strings.Join(names, ",") != "ens192,ens192" {
		t.Fatalf("names %q", names)
	}
	// A match with a driver keeps the match and set-name, drops only the MAC.
	in2 := "network:\n  ethernets:\n    lan:\n      match:\n        macaddress: aa\n        driver: vmxnet3\n      set-name: lan0\n"
	out2, _ := fixNetplan(in2)
	if out2 != "network:\n  ethernets:\n    lan:\n      match:\n        driver: vmxnet3\n      set-name: lan0\n" {
		t.Fatalf("got %q", out2)
	}
}

func TestMACLines(t *testing.T) {
	out, gone := removeMACLines("DEVICE=eth0\nHWADDR=00:50:56:01:02:03\nIPADDR=10.0.0.2\n", reIfcfgHWADDR)
	if out != "DEVICE=eth0\nIPADDR=10.0.0.2\n" || len(gone) != 1 {
		t.Fatalf("%q", out)
	}
	udev := "# generated\nSUBSYSTEM==\"net\", ACTION==\"add\", ATTR{address}==\"00:50:56:9a:3c:01\", NAME=\"ens192\"\n"
	out, gone = removeMACLines(udev, reUdevMAC)
	if !onlyComments(out) || len(gone) != 1 {
		t.Fatalf("%q", out)
	}
}

func TestNetworkdMatchName(t *testing.T) {
	in := "[Match]\nMACAddress=00:50:56:aa:bb:cc\n\n[Network]\nAddress=10.0.0.5/24\n"
	out, gone := networkdMatchName(in, "ens192")
	if out != "[Match]\nName=ens192\n\n[Network]\nAddress=10.0.0.5/24\n" || len(gone) != 1 {
		t.Fatalf("%q %q", out, gone)
	}
	in = "[Match]\nName=ens192\nMACAddress=00:50:56:aa:bb:cc\n"
	if out, _ := networkdMatchName(in, "ens192"); out != "[Match]\nName=ens192\n" {
		t.Fatalf("%q", out)
	}
	// MACAddress= outside [Match] (setting the MAC) is kept.
	in = "[Match]\nName=eth0\n[Link]\nMACAddress=52:54:00:00:00:01\n"
	if out, gone := networkdMatchName(in, "eth0"); out != in || len(gone) != 0 {
		t.Fatalf("%q", out)
	}
}
