package vmwaretest

import (
	"compress/gzip"
	"crypto/sha1"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/internal/testutil"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmware/govmomi/vim25/types"
)

const mib = 1 << 20

// Disk sizes of what New builds.
const (
	Web01Disk0 = 64 * mib
	Web01Disk1 = 32 * mib
	Web01Disk2 = 16 * mib
	Win01Disk0 = 128 * mib
	GoldenDisk = 512 * mib // the seSparse sample's capacity
	DB01Disk0  = 32 * mib
	DB01RDM    = 1024 * mib
)

// MACs of what New builds.
const (
	Web01MAC0 = "00:50:56:aa:00:01"
	Web01MAC1 = "00:50:56:aa:00:02"
	Win01MAC0 = "00:50:56:aa:01:01"
	DB01MAC0  = "00:50:56:aa:02:01"
)

type vmSpec struct {
	config    types.VirtualMachineConfigSpec
	snapshots []string
	powerOn   bool
}

func dsPath(rel string) string { return "[" + Datastore + "] " + rel }

// flatDisk writes DIR/rel (a VMFS descriptor) and its -flat.vmdk extent: a
// sparse file with deterministic data at its start and middle.
func (e *Env) flatDisk(rel string, size int64, cid uint32) error {
	p := e.Path(rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	flat := strings.TrimSuffix(filepath.Base(rel), ".vmdk") + "-flat.vmdk"
	desc := FlatDescriptor(flat, size, cid)
	if err := os.WriteFile(p, []byte(desc), 0o644); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(filepath.Dir(p), flat))
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(uint64(cid), 7))
	for _, r := range [][2]int64{{0, mib}, {size / 2, mib / 2}} {
		buf := make([]byte, r[1])
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		if _, err := f.WriteAt(buf, r[0]); err != nil {
			return err
		}
	}
	return f.Close()
}

// writeDisks puts every disk file of the inventory into the datastore folder.
func (e *Env) writeDisks() error {
	for _, d := range []struct {
		rel  string
		size int64
		cid  uint32
	}{
		{"web01/web01.vmdk", Web01Disk0, 0x1a000001},
		{"web01/web01_1.vmdk", Web01Disk1, 0x1a000002},
		{"web01/web01_2.vmdk", Web01Disk2, 0x1a000003},
		{"win01/win01.vmdk", Win01Disk0, 0x1b000001},
		{"golden/golden.vmdk", GoldenDisk, 0x1c000001},
		{"db01/db01.vmdk", DB01Disk0, 0x1d000001},
	} {
		if err := e.flatDisk(d.rel, d.size, d.cid); err != nil {
			return fmt.Errorf("write %s: %w", d.rel, err)
		}
	}
	// The linked clone's delta: a real ESXi seSparse extent.
	src, err := SamplesDir()
	if err != nil {
		return err
	}
	in, err := os.Open(filepath.Join(src, "sesparse-extent.vmdk.gz"))
	if err != nil {
		return err
	}
	defer in.Close()
	zr, err := gzip.NewReader(in)
	if err != nil {
		return fmt.Errorf("%s: %w", in.Name(), err)
	}
	if err := os.MkdirAll(e.Path("linked01"), 0o755); err != nil {
		return err
	}
	out, err := os.Create(e.Path("linked01/linked01-000001-sesparse.vmdk"))
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, zr); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	desc := fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=1e000001
parentCID=1c000001
createType="seSparse"
parentFileNameHint="../golden/golden.vmdk"
# Extent description
RW %d SESPARSE "linked01-000001-sesparse.vmdk"

# The Disk Data Base
#DDB

ddb.encoding = "UTF-8"
ddb.grain = "8"
`, GoldenDisk/512)
	if err := os.WriteFile(e.Path("linked01/linked01-000001.vmdk"), []byte(desc), 0o644); err != nil {
		return err
	}
	// The RDM's mapping file (its extent is a LUN, never a file).
	rdm := fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=1d000002
parentCID=ffffffff
createType="vmfsPassthroughRawDeviceMap"

# Extent description
RW %d VMFSRDM "db01_1-rdmp.vmdk"
`, DB01RDM/512)
	return os.WriteFile(e.Path("db01/db01_1.vmdk"), []byte(rdm), 0o644)
}

// SamplesDir is the folder of the project's real VMDK samples.
func SamplesDir() (string, error) { return testutil.Samples() }

func ptr[T any](v T) *T { return &v }

func scsiCtl(key, bus int32) types.BaseVirtualDevice {
	return &types.ParaVirtualSCSIController{VirtualSCSIController: types.VirtualSCSIController{
		SharedBus:         types.VirtualSCSISharingNoSharing,
		VirtualController: types.VirtualController{BusNumber: bus, VirtualDevice: types.VirtualDevice{Key: key}},
	}}
}

func disk(key, ctl, unit int32, size int64, backing types.BaseVirtualDeviceBackingInfo) types.BaseVirtualDevice {
	return &types.VirtualDisk{
		VirtualDevice:   types.VirtualDevice{Key: key, ControllerKey: ctl, UnitNumber: ptr(unit), Backing: backing},
		CapacityInBytes: size,
		CapacityInKB:    size / 1024,
	}
}

func flatBacking(rel string, mode types.VirtualDiskMode, thin bool) *types.VirtualDiskFlatVer2BackingInfo {
	return &types.VirtualDiskFlatVer2BackingInfo{
		VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: dsPath(rel)},
		DiskMode:                     string(mode),
		ThinProvisioned:              ptr(thin),
	}
}

func nic(card types.BaseVirtualDevice, key int32, mac string, backing types.BaseVirtualDeviceBackingInfo) types.BaseVirtualDevice {
	c := card.(types.BaseVirtualEthernetCard).GetVirtualEthernetCard()
	c.Key = key
	c.Backing = backing
	c.AddressType = string(types.VirtualEthernetCardMacTypeManual)
	c.MacAddress = mac
	c.Connectable = &types.VirtualDeviceConnectInfo{StartConnected: true, Connected: true}
	return card
}

func stdNet(name string) types.BaseVirtualDeviceBackingInfo {
	return &types.VirtualEthernetCardNetworkBackingInfo{
		VirtualDeviceDeviceBackingInfo: types.VirtualDeviceDeviceBackingInfo{DeviceName: name},
	}
}

func add(devs ...types.BaseVirtualDevice) []types.BaseVirtualDeviceConfigSpec {
	var out []types.BaseVirtualDeviceConfigSpec
	for _, d := range devs {
		out = append(out, &types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: d})
	}
	return out
}

func files(name string) *types.VirtualMachineFileInfo {
	return &types.VirtualMachineFileInfo{VmPathName: dsPath(name + "/" + name + ".vmx")}
}

func (e *Env) web01(dvpg types.BaseVirtualDeviceBackingInfo) vmSpec {
	return vmSpec{
		config: types.VirtualMachineConfigSpec{
			Name: VMWeb, GuestId: "debian11_64Guest", NumCPUs: 2, NumCoresPerSocket: ptr[int32](1), MemoryMB: 2048,
			Version: "vmx-19", Firmware: string(types.GuestOsDescriptorFirmwareTypeBios), Files: files(VMWeb),
			Uuid: "4213a1b2-0001-4c3d-9e8f-aabbccddee01", InstanceUuid: "5013a1b2-0001-4c3d-9e8f-aabbccddee01",
			BootOptions: &types.VirtualMachineBootOptions{BootOrder: []types.BaseVirtualMachineBootOptionsBootableDevice{
				&types.VirtualMachineBootOptionsBootableDiskDevice{DeviceKey: 2000},
			}},
			DeviceChange: add(
				scsiCtl(1000, 0),
				&types.VirtualAHCIController{VirtualSATAController: types.VirtualSATAController{
					VirtualController: types.VirtualController{BusNumber: 0, VirtualDevice: types.VirtualDevice{Key: 15000}}}},
				disk(2000, 1000, 0, Web01Disk0, flatBacking("web01/web01.vmdk", types.VirtualDiskModePersistent, true)),
				disk(16000, 15000, 0, Web01Disk1, flatBacking("web01/web01_1.vmdk", types.VirtualDiskModePersistent, false)),
				disk(2001, 1000, 1, Web01Disk2, flatBacking("web01/web01_2.vmdk", types.VirtualDiskModeIndependent_persistent, true)),
				nic(&types.VirtualVmxnet3{}, 4000, Web01MAC0, stdNet(Network1)),
				nic(&types.VirtualE1000e{}, 4001, Web01MAC1, dvpg),
			),
		},
		snapshots: []string{"base-install", "pre-upgrade"},
		powerOn:   true,
	}
}

func (e *Env) win01() vmSpec {
	b := flatBacking("win01/win01.vmdk", types.VirtualDiskModePersistent, true)
	b.ChangeId = WinChangeID
	return vmSpec{
		config: types.VirtualMachineConfigSpec{
			Name: VMWin, GuestId: "windows2019srv_64Guest", NumCPUs: 4, NumCoresPerSocket: ptr[int32](2), MemoryMB: 4096,
			Version: "vmx-19", Firmware: string(types.GuestOsDescriptorFirmwareTypeEfi), Files: files(VMWin),
			Uuid: "4213a1b2-0002-4c3d-9e8f-aabbccddee02", InstanceUuid: "5013a1b2-0002-4c3d-9e8f-aabbccddee02",
			BootOptions:           &types.VirtualMachineBootOptions{EfiSecureBootEnabled: ptr(true)},
			ChangeTrackingEnabled: ptr(true),
			ExtraConfig: []types.BaseOptionValue{
				&types.OptionValue{Key: "ctkEnabled", Value: "TRUE"},
				&types.OptionValue{Key: "nvme0:0.ctkEnabled", Value: "TRUE"},
			},
			DeviceChange: add(
				&types.VirtualNVMEController{VirtualController: types.VirtualController{BusNumber: 0, VirtualDevice: types.VirtualDevice{Key: 31000}}},
				disk(31001, 31000, 0, Win01Disk0, b),
				nic(&types.VirtualE1000e{}, 4000, Win01MAC0, stdNet(Network1)),
			),
		},
	}
}

func (e *Env) linked01() vmSpec {
	return vmSpec{
		config: types.VirtualMachineConfigSpec{
			Name: VMLinked, GuestId: "ubuntu64Guest", NumCPUs: 1, NumCoresPerSocket: ptr[int32](1), MemoryMB: 1024,
			Version: "vmx-19", Firmware: string(types.GuestOsDescriptorFirmwareTypeBios), Files: files(VMLinked),
			DeviceChange: add(
				scsiCtl(1000, 0),
				disk(2000, 1000, 0, GoldenDisk, &types.VirtualDiskSeSparseBackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: dsPath("linked01/linked01-000001.vmdk")},
					DiskMode:                     string(types.VirtualDiskModePersistent),
					Parent: &types.VirtualDiskSeSparseBackingInfo{
						VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: dsPath("golden/golden.vmdk")},
						DiskMode:                     string(types.VirtualDiskModePersistent),
					},
				}),
				nic(&types.VirtualVmxnet3{}, 4000, "00:50:56:aa:03:01", stdNet(Network1)),
			),
		},
	}
}

func (e *Env) db01() vmSpec {
	return vmSpec{
		config: types.VirtualMachineConfigSpec{
			Name: VMDB, GuestId: "rhel8_64Guest", NumCPUs: 2, MemoryMB: 2048,
			Version: "vmx-19", Firmware: string(types.GuestOsDescriptorFirmwareTypeBios), Files: files(VMDB),
			DeviceChange: add(
				&types.VirtualLsiLogicSASController{VirtualSCSIController: types.VirtualSCSIController{
					SharedBus:         types.VirtualSCSISharingNoSharing,
					VirtualController: types.VirtualController{BusNumber: 0, VirtualDevice: types.VirtualDevice{Key: 1000}}}},
				disk(2000, 1000, 0, DB01Disk0, flatBacking("db01/db01.vmdk", types.VirtualDiskModePersistent, false)),
				disk(2001, 1000, 1, DB01RDM, &types.VirtualDiskRawDiskMappingVer1BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: dsPath("db01/db01_1.vmdk")},
					DeviceName:                   "/vmfs/devices/disks/naa.600508b1001c2b3c4d5e6f7a8b9c0d1e",
					LunUuid:                      "0200000000600508b1001c2b3c4d5e6f7a8b9c0d1e4c4f47494341",
					CompatibilityMode:            string(types.VirtualDiskCompatibilityModePhysicalMode),
					DiskMode:                     string(types.VirtualDiskModeIndependent_persistent),
				}),
				nic(&types.VirtualVmxnet3{}, 4000, DB01MAC0, stdNet(Network1)),
			),
		},
	}
}

func thumbprintSHA1(der []byte) string {
	sum := sha1.Sum(der)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

// FlatDescriptor is the text of an ESXi-style VMFS descriptor whose one
// extent is the flat file named flat (size bytes), with the given CID.
func FlatDescriptor(flat string, size int64, cid uint32) string {
	return fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=%08x
parentCID=ffffffff
createType="vmfs"

# Extent description
RW %d VMFS "%s"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.longContentID = "00000000000000000000000%09x"
ddb.uuid = "60 00 C2 9a %02x %02x %02x %02x-00 11 22 33 44 55 66 77"
ddb.virtualHWVersion = "19"
`, cid, size/512, flat, cid, byte(cid>>24), byte(cid>>16), byte(cid>>8), byte(cid))
}
