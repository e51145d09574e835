package ova

import (
	"encoding/xml"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// VM is what an OVF descriptor says about its virtual machine, kept for the
// domain XML written later.
type VM struct {
	Name           string `json:"name"`
	OSType         string `json:"os_type,omitempty"` // vmw:osType, e.g. "ubuntu64Guest"
	OSID           int    `json:"os_id,omitempty"`   // CIM operating system id
	OSDescription  string `json:"os_description,omitempty"`
	Firmware       string `json:"firmware"` // "bios" or "efi"
	SecureBoot     bool   `json:"secure_boot,omitempty"`
	CPUs           int    `json:"cpus"`
	CoresPerSocket int    `json:"cores_per_socket,omitempty"`
	MemoryBytes    int64  `json:"memory_bytes"`
	Disks          []Disk `json:"disks"` // in the VM's order: controller, then unit
	NICs           []NIC  `json:"nics,omitempty"`
}

// Disk is one virtual disk of the VM.
type Disk struct {
	ID            string `json:"id"`             // ovf:diskId
	File          string `json:"file,omitempty"` // member name in the package (href)
	Capacity      int64  `json:"capacity"`       // virtual size in bytes
	PopulatedSize int64  `json:"populated_size,omitempty"`
	Format        string `json:"format,omitempty"`     // the OVF format URI (…#streamOptimized)
	Controller    string `json:"controller,omitempty"` // ide, scsi, sata, nvme
	ControllerSub string `json:"controller_model,omitempty"`
	Unit          int    `json:"unit"` // AddressOnParent
}

// NIC is one network adapter.
type NIC struct {
	Name    string `json:"name,omitempty"`
	Network string `json:"network,omitempty"`
	Model   string `json:"model,omitempty"` // VmxNet3, E1000, E1000e, ...
	MAC     string `json:"mac,omitempty"`
}

type envelope struct {
	References []ovfFile `xml:"References>File"`
	Disks      []ovfDisk `xml:"DiskSection>Disk"`
	VS         struct {
		ID   string `xml:"id,attr"`
		Name string `xml:"Name"`
		OS   struct {
			ID          int    `xml:"id,attr"`
			OSType      string `xml:"osType,attr"`
			Description string `xml:"Description"`
		} `xml:"OperatingSystemSection"`
		HW struct {
			Items        []item      `xml:"Item"`
			StorageItems []item      `xml:"StorageItem"`
			PortItems    []item      `xml:"EthernetPortItem"`
			Configs      []vmwConfig `xml:"Config"`
		} `xml:"VirtualHardwareSection"`
	} `xml:"VirtualSystem"`
}

type ovfFile struct {
	ID          string `xml:"id,attr"`
	Href        string `xml:"href,attr"`
	Size        int64  `xml:"size,attr"`
	Compression string `xml:"compression,attr"`
	ChunkSize   int64  `xml:"chunkSize,attr"`
}

type ovfDisk struct {
	DiskID    string `xml:"diskId,attr"`
	FileRef   string `xml:"fileRef,attr"`
	Capacity  string `xml:"capacity,attr"`
	Units     string `xml:"capacityAllocationUnits,attr"`
	Format    string `xml:"format,attr"`
	Populated int64  `xml:"populatedSize,attr"`
}

type vmwConfig struct {
	Key   string `xml:"key,attr"`
	Value string `xml:"value,attr"`
}

type item struct {
	InstanceID      string   `xml:"InstanceID"`
	ResourceType    int      `xml:"ResourceType"`
	ResourceSubType string   `xml:"ResourceSubType"`
	ElementName     string   `xml:"ElementName"`
	VirtualQuantity int64    `xml:"VirtualQuantity"`
	AllocationUnits string   `xml:"AllocationUnits"`
	Parent          string   `xml:"Parent"`
	AddressOnParent string   `xml:"AddressOnParent"`
	HostResource    []string `xml:"HostResource"`
	Connection      []string `xml:"Connection"`
	Address         string   `xml:"Address"`
	CoresPerSocket  int      `xml:"CoresPerSocket"`
}

// CIM resource types used here.
const (
	rtCPU     = 3
	rtMemory  = 4
	rtIDE     = 5
	rtSCSI    = 6
	rtNIC     = 10
	rtDisk    = 17
	rtStorage = 20 // other storage controller: SATA (AHCI), NVMe
)

// parseOVF reads a descriptor into a VM and the file references by id.
func parseOVF(b []byte) (*VM, map[string]ovfFile, error) {
	var env envelope
	if err := xml.Unmarshal(b, &env); err != nil {
		return nil, nil, fmt.Errorf("OVF descriptor: %w", err)
	}
	files := map[string]ovfFile{}
	for _, f := range env.References {
		files[f.ID] = f
	}
	vm := &VM{Name: env.VS.Name, OSType: env.VS.OS.OSType, OSID: env.VS.OS.ID,
		OSDescription: strings.TrimSpace(env.VS.OS.Description), Firmware: "bios"}
	if vm.Name == "" {
		vm.Name = env.VS.ID
	}
	for _, c := range env.VS.HW.Configs {
		switch c.Key {
		case "firmware":
			if strings.EqualFold(c.Value, "efi") {
				vm.Firmware = "efi"
			}
		case "uefi.secureBoot.enabled":
			vm.SecureBoot = strings.EqualFold(c.Value, "true")
		}
	}
	items := append(append(append([]item(nil), env.VS.HW.Items...), env.VS.HW.StorageItems...), env.VS.HW.PortItems...)
	ctrlRank := map[string]int{}
	ctrls := map[string]item{}
	for i, it := range items {
		switch it.ResourceType {
		case rtIDE, rtSCSI, rtStorage:
			ctrlRank[strings.TrimSpace(it.InstanceID)] = i
			ctrls[strings.TrimSpace(it.InstanceID)] = it
		}
	}
	disks := map[string]ovfDisk{}
	for _, d := range env.Disks {
		disks[d.DiskID] = d
	}
	type placed struct {
		Disk
		rank int
	}
	var order []placed
	used := map[string]bool{}
	for _, it := range items {
		switch it.ResourceType {
		case rtCPU:
			vm.CPUs = int(it.VirtualQuantity)
			vm.CoresPerSocket = it.CoresPerSocket
		case rtMemory:
			unit, err := parseUnits(it.AllocationUnits, 1<<20)
			if err != nil {
				return nil, nil, fmt.Errorf("OVF memory item: %w", err)
			}
			vm.MemoryBytes = it.VirtualQuantity * unit
		case rtNIC:
			n := NIC{Name: strings.TrimSpace(it.ElementName), Model: strings.TrimSpace(it.ResourceSubType), MAC: strings.TrimSpace(it.Address)}
			if len(it.Connection) > 0 {
				n.Network = strings.TrimSpace(it.Connection[0])
			}
			vm.NICs = append(vm.NICs, n)
		case rtDisk:
			for _, hr := range it.HostResource {
				id := diskRef(hr)
				d, ok := disks[id]
				if !ok || used[id] {
					continue
				}
				used[id] = true
				disk, err := makeDisk(d, files)
				if err != nil {
					return nil, nil, err
				}
				parent := strings.TrimSpace(it.Parent)
				c := ctrls[parent]
				disk.Controller, disk.ControllerSub = controllerKind(c), strings.TrimSpace(c.ResourceSubType)
				disk.Unit, _ = strconv.Atoi(strings.TrimSpace(it.AddressOnParent))
				rank, ok := ctrlRank[parent]
				if !ok {
					rank = len(items)
				}
				order = append(order, placed{disk, rank})
			}
		}
	}
	sort.SliceStable(order, func(i, j int) bool {
		if order[i].rank != order[j].rank {
			return order[i].rank < order[j].rank
		}
		return order[i].Unit < order[j].Unit
	})
	for _, p := range order {
		vm.Disks = append(vm.Disks, p.Disk)
	}
	for _, d := range env.Disks { // disks no item attaches, in section order
		if !used[d.DiskID] {
			disk, err := makeDisk(d, files)
			if err != nil {
				return nil, nil, err
			}
			vm.Disks = append(vm.Disks, disk)
		}
	}
	return vm, files, nil
}

func makeDisk(d ovfDisk, files map[string]ovfFile) (Disk, error) {
	unit, err := parseUnits(d.Units, 1)
	if err != nil {
		return Disk{}, fmt.Errorf("OVF disk %s: %w", d.DiskID, err)
	}
	capacity, err := strconv.ParseInt(strings.TrimSpace(d.Capacity), 10, 64)
	if err != nil || capacity < 0 {
		return Disk{}, fmt.Errorf("OVF disk %s: capacity %q is not a number", d.DiskID, d.Capacity)
	}
	if capacity > (1<<62)/unit {
		return Disk{}, fmt.Errorf("OVF disk %s: capacity %q × %d bytes is too large", d.DiskID, d.Capacity, unit)
	}
	out := Disk{ID: d.DiskID, Capacity: capacity * unit, PopulatedSize: d.Populated, Format: d.Format}
	if d.FileRef != "" {
		f, ok := files[d.FileRef]
		if !ok {
			return Disk{}, fmt.Errorf("OVF disk %s: fileRef %q is not in References", d.DiskID, d.FileRef)
		}
		out.File = f.Href
	}
	return out, nil
}

// diskRef turns "ovf:/disk/vmdisk1" (or "/disk/vmdisk1") into "vmdisk1".
func diskRef(hr string) string {
	hr = strings.TrimSpace(hr)
	if i := strings.LastIndex(hr, "/disk/"); i >= 0 {
		return hr[i+len("/disk/"):]
	}
	return hr
}

func controllerKind(c item) string {
	sub := strings.ToLower(c.ResourceSubType)
	switch {
	case c.ResourceType == rtIDE:
		return "ide"
	case c.ResourceType == rtSCSI:
		return "scsi"
	case strings.Contains(sub, "nvme"):
		return "nvme"
	case strings.Contains(sub, "sata") || strings.Contains(sub, "ahci"):
		return "sata"
	case c.ResourceType == rtStorage:
		return "other"
	}
	return ""
}

// parseUnits parses a DMTF programmatic unit: "byte", "byte * 2^30",
// "MegaBytes", "KB", "byte * 1024"; "" gives def.
func parseUnits(s string, def int64) (int64, error) {
	u := strings.ToLower(strings.Join(strings.Fields(s), ""))
	switch u {
	case "":
		return def, nil
	case "byte", "bytes":
		return 1, nil
	case "kilobytes", "kb", "kib":
		return 1 << 10, nil
	case "megabytes", "mb", "mib":
		return 1 << 20, nil
	case "gigabytes", "gb", "gib":
		return 1 << 30, nil
	case "terabytes", "tb", "tib":
		return 1 << 40, nil
	}
	if rest, ok := strings.CutPrefix(u, "byte*"); ok {
		if exp, ok := strings.CutPrefix(rest, "2^"); ok {
			n, err := strconv.Atoi(exp)
			if err == nil && n >= 0 && n <= 50 {
				return 1 << n, nil
			}
		} else if n, err := strconv.ParseInt(rest, 10, 64); err == nil && n > 0 && n <= 1<<40 {
			return n, nil
		}
	}
	return 0, fmt.Errorf("allocation units %q not understood", s)
}
