package vmware

import (
	"context"
	"fmt"
	"net/url"
	"path"
	"strings"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// DiskPath says where the data plane can read one disk's bytes.
type DiskPath struct {
	Key           int32  `json:"key"`
	Label         string `json:"label"`
	Address       string `json:"address"`
	CapacityBytes int64  `json:"capacity_bytes"`
	Snapshot      string `json:"snapshot,omitempty"` // MoRef of the state read; "" = current
	Datastore     string `json:"datastore"`
	DatastoreType string `json:"datastore_type"` // VMFS, NFS, vsan, VVOL, ...
	// Method is the recommended transport: https, ssh, vddk, or none (the
	// disk cannot be read this way at all; see Warnings).
	Method string `json:"method"`
	// URL is the HTTPS /folder URL of the top descriptor, through the server
	// we are connected to. The VMDK layer opens it and reaches its extents
	// and parents as sibling names (Layers lists each file's URL too).
	URL string `json:"url,omitempty"`
	// HostURL is the same file through the ESXi host running the VM; Pinned
	// says reads must use it (the VM runs and holds the top file's lock).
	HostURL string `json:"host_url,omitempty"`
	Pinned  bool   `json:"pinned,omitempty"`
	Host    string `json:"host,omitempty"`
	// SSH is ssh://HOST/vmfs/volumes/DS/... of the top descriptor (ESXi shell).
	SSH      string       `json:"ssh,omitempty"`
	VDDK     *VDDKRequest `json:"vddk,omitempty"`
	Layers   []LayerPath  `json:"layers"`
	Warnings []string     `json:"warnings,omitempty"`
}

// LayerPath is one file of the chain, top first, with the URLs of its
// descriptor and data files.
type LayerPath struct {
	File      string   `json:"file"`
	Type      string   `json:"type"`
	URL       string   `json:"url,omitempty"`
	DataFiles []string `json:"data_files,omitempty"`
	DataURLs  []string `json:"data_urls,omitempty"`
	SSH       string   `json:"ssh,omitempty"`
}

// VDDKRequest is what `nbdkit vddk` needs to open the disk.
type VDDKRequest struct {
	Server     string `json:"server"`
	Thumbprint string `json:"thumbprint"`
	VM         string `json:"vm"` // moref=vm-42
	Snapshot   string `json:"snapshot,omitempty"`
	File       string `json:"file"` // "[ds] dir/name.vmdk"
	Transports string `json:"transports,omitempty"`
}

// DisksAt returns a VM's disks at a snapshot (name or MoRef), or at the
// current state for "".
func (c *Client) DisksAt(ctx context.Context, vm *VM, snapshot string) ([]Disk, string, error) {
	if snapshot == "" {
		info, err := c.Info(ctx, vm)
		if err != nil {
			return nil, "", err
		}
		return info.Disks, "", nil
	}
	ref, err := c.FindSnapshot(ctx, vm, snapshot)
	if err != nil {
		return nil, "", err
	}
	pc := property.DefaultCollector(c.vim)
	var snap mo.VirtualMachineSnapshot
	if err := pc.RetrieveOne(ctx, ref, []string{"config"}, &snap); err != nil {
		return nil, "", fmt.Errorf("read snapshot %s of %s: %w", snapshot, vm.Name, err)
	}
	var m mo.VirtualMachine
	if err := pc.RetrieveOne(ctx, vm.Ref, []string{"layoutEx", "config.changeTrackingEnabled", "config.extraConfig"}, &m); err != nil {
		return nil, "", fmt.Errorf("read VM %s: %w", vm.Name, err)
	}
	var layout []types.VirtualMachineFileLayoutExDiskLayout
	if m.LayoutEx != nil {
		for _, s := range m.LayoutEx.Snapshot {
			if s.Key == ref {
				layout = s.Disk
			}
		}
	}
	devs := object.VirtualDeviceList(snap.Config.Hardware.Device)
	names := newNamer(c)
	for _, d := range devs {
		if disk, ok := d.(*types.VirtualDisk); ok {
			for _, l := range backingChain(disk.Backing) {
				if l.ds != nil {
					names.want(*l.ds)
				}
			}
		}
	}
	if err := names.resolve(ctx); err != nil {
		return nil, "", err
	}
	extra := map[string]string{}
	cbt := false
	if m.Config != nil {
		for _, o := range m.Config.ExtraConfig {
			if ov := o.GetOptionValue(); ov != nil {
				extra[ov.Key] = fmt.Sprint(ov.Value)
			}
		}
		cbt = m.Config.ChangeTrackingEnabled != nil && *m.Config.ChangeTrackingEnabled
	}
	return disks(devs, controllers(devs), extra, cbt, names, m.LayoutEx, layout), ref.Value, nil
}

// ResolveDisks resolves where each disk of a VM can be read, at a snapshot
// (name or MoRef) or at the current state ("").
func (c *Client) ResolveDisks(ctx context.Context, vm *VM, snapshot string) ([]DiskPath, error) {
	info, err := c.Info(ctx, vm)
	if err != nil {
		return nil, err
	}
	ds, snapRef, err := c.DisksAt(ctx, vm, snapshot)
	if err != nil {
		return nil, err
	}
	dsTypes, err := c.datastoreTypes(ctx, ds, vm)
	if err != nil {
		return nil, err
	}
	out := make([]DiskPath, 0, len(ds))
	for _, d := range ds {
		out = append(out, c.resolveDisk(info, d, snapRef, dsTypes))
	}
	return out, nil
}

// datastoreTypes maps the datastores of the disks' chains to their types.
func (c *Client) datastoreTypes(ctx context.Context, ds []Disk, vm *VM) (map[string]string, error) {
	out := map[string]string{}
	finder := find.NewFinder(c.vim, false)
	dc, err := finder.Datacenter(ctx, "/"+vm.DCPath)
	if err != nil {
		return nil, fmt.Errorf("datacenter of %s: %w", vm.Name, err)
	}
	finder.SetDatacenter(dc)
	for _, d := range ds {
		for _, l := range d.Chain {
			if _, ok := out[l.Datastore]; ok || l.Datastore == "" {
				continue
			}
			obj, err := finder.Datastore(ctx, l.Datastore)
			if err != nil {
				return nil, fmt.Errorf("%w: datastore %q of %s", ErrNotFound, l.Datastore, vm.Name)
			}
			var m mo.Datastore
			if err := obj.Properties(ctx, obj.Reference(), []string{"summary.type"}, &m); err != nil {
				return nil, fmt.Errorf("datastore %s: %w", l.Datastore, err)
			}
			out[l.Datastore] = m.Summary.Type
		}
	}
	return out, nil
}

func (c *Client) resolveDisk(info *VMInfo, d Disk, snap string, dsTypes map[string]string) DiskPath {
	p := DiskPath{Key: d.Key, Label: d.Label, Address: d.Address, CapacityBytes: d.CapacityBytes, Snapshot: snap, Datastore: d.Datastore, DatastoreType: dsTypes[d.Datastore], Host: info.Host}
	p.VDDK = &VDDKRequest{Server: c.url.Hostname(), Thumbprint: c.ServerThumbprint(), VM: "moref=" + info.MoRef, Snapshot: snap, File: d.File}
	p.Method = "https"
	if info.PowerState == string(types.VirtualMachinePowerStatePoweredOn) && snap == "" {
		p.Pinned = true
		p.Warnings = append(p.Warnings, fmt.Sprintf("the VM is running on %s, which holds the lock of the top file: read at a snapshot (convert and sync take one) or through that host", info.Host))
	}
	if d.Independent && !strings.HasPrefix(d.Provisioning, "rdm-") { // an RDM gets its own warning
		p.Warnings = append(p.Warnings, "independent disk: snapshots do not capture it, so a running VM's copy of it is not consistent; power the VM off to copy it")
	}
	for _, l := range d.Chain {
		lp := LayerPath{File: l.File, Type: l.Type, DataFiles: l.DataFiles}
		var dp object.DatastorePath
		if dp.FromString(l.File) {
			lp.URL = c.folderURL(c.url.Host, info.DCPath, dp)
			lp.SSH = "ssh://" + info.Host + "/vmfs/volumes/" + escapePath(dp.Datastore+"/"+dp.Path)
			for _, f := range l.DataFiles {
				var fp object.DatastorePath
				if fp.FromString(f) {
					lp.DataURLs = append(lp.DataURLs, c.folderURL(c.url.Host, info.DCPath, fp))
				}
			}
		}
		switch l.Type {
		case "rdm":
			p.Method = "none"
			p.Warnings = append(p.Warnings, fmt.Sprintf("%s is a raw device mapping (%s): its bytes live on a LUN, not in a file; copy the LUN separately or migrate it to a VMDK (Storage vMotion) first", l.File, d.Provisioning))
		case "native":
			p.Method = "vddk"
			p.Warnings = append(p.Warnings, fmt.Sprintf("%s is a native (vSAN/vVol) delta: no file to read; use VDDK", l.File))
		case "unsupported":
			p.Method = "none"
			p.Warnings = append(p.Warnings, fmt.Sprintf("%s has an unsupported backing (%s)", l.File, l.Backing))
		}
		p.Layers = append(p.Layers, lp)
	}
	switch strings.ToLower(p.DatastoreType) {
	case "vsan", "vvol":
		if p.Method != "none" {
			p.Method = "vddk"
		}
		p.Warnings = append(p.Warnings, fmt.Sprintf("datastore %s is %s: objects have no flat files to read over /folder or SSH; only VDDK can read this disk", d.Datastore, p.DatastoreType))
	}
	if len(p.Layers) > 0 {
		p.URL, p.SSH = p.Layers[0].URL, p.Layers[0].SSH
		var dp object.DatastorePath
		if dp.FromString(d.File) && c.IsVC() && info.Host != "" {
			p.HostURL = folderURL(info.Host, "ha-datacenter", dp)
		}
	}
	if p.Method == "none" || p.Method == "vddk" {
		p.URL, p.HostURL, p.SSH = "", "", ""
	}
	return p
}

// folderURL is https://HOST/folder/PATH?dcPath=DC&dsName=DS.
func (c *Client) folderURL(host, dcPath string, dp object.DatastorePath) string {
	u := folderURL(host, dcPath, dp)
	if c.url.Scheme == "http" {
		u = "http" + strings.TrimPrefix(u, "https")
	}
	return u
}

func folderURL(host, dcPath string, dp object.DatastorePath) string {
	u := url.URL{Scheme: "https", Host: host, Path: "/folder/" + dp.Path}
	q := url.Values{}
	q.Set("dcPath", dcPath)
	q.Set("dsName", dp.Datastore)
	u.RawQuery = q.Encode()
	return u.String()
}

func escapePath(p string) string {
	parts := strings.Split(path.Clean(p), "/")
	for i, s := range parts {
		parts[i] = url.PathEscape(s)
	}
	return strings.Join(parts, "/")
}
