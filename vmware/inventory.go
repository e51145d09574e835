package vmware

import (
	"context"
	"errors"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/internal/units"
	"path"
	"sort"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/list"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// Entry is one child of an inventory folder.
type Entry struct {
	Name  string `json:"name"`
	Type  string `json:"type"` // Datacenter, Folder, VirtualMachine, HostSystem, Datastore, Network, ...
	Path  string `json:"path"`
	MoRef string `json:"moref"`
	// What a person wants at a glance: power state and guest (VMs),
	// connection state (hosts), type and free/capacity (datastores).
	Summary string `json:"summary,omitempty"`
}

// List returns the children of an inventory path ("" or "/" is the root):
// datacenters, their vm/host/datastore/network folders, and the objects in
// those.
func (c *Client) List(ctx context.Context, p string) ([]Entry, error) {
	if p == "" {
		p = "/"
	}
	if p[0] != '/' {
		p = "/" + p
	}
	p = path.Clean(p)
	finder := find.NewFinder(c.vim, false)
	els, err := finder.ManagedObjectListChildren(ctx, p)
	if err == nil && len(els) == 0 && p != "/" {
		// an empty folder, or nothing at all?
		var self []list.Element
		if self, err = finder.ManagedObjectList(ctx, p); err == nil && len(self) == 0 {
			err = errors.New("no such path")
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%w: inventory path %s on %s", ErrNotFound, p, c.Host())
	}
	out := make([]Entry, 0, len(els))
	var vms, hosts, dss []types.ManagedObjectReference
	for _, e := range els {
		ref := e.Object.Reference()
		out = append(out, Entry{Name: path.Base(e.Path), Type: ref.Type, Path: e.Path, MoRef: ref.Value})
		switch ref.Type {
		case "VirtualMachine":
			vms = append(vms, ref)
		case "HostSystem":
			hosts = append(hosts, ref)
		case "Datastore":
			dss = append(dss, ref)
		}
	}
	summary := map[string]string{}
	pc := property.DefaultCollector(c.vim)
	if len(vms) > 0 {
		var mos []mo.VirtualMachine
		if err := pc.Retrieve(ctx, vms, []string{"runtime.powerState", "config.guestId"}, &mos); err != nil {
			return nil, fmt.Errorf("list %s: %w", p, err)
		}
		for _, m := range mos {
			s := string(m.Runtime.PowerState)
			if m.Config != nil && m.Config.GuestId != "" {
				s += ", " + m.Config.GuestId
			}
			summary[m.Self.Value] = s
		}
	}
	if len(hosts) > 0 {
		var mos []mo.HostSystem
		if err := pc.Retrieve(ctx, hosts, []string{"runtime.connectionState"}, &mos); err != nil {
			return nil, fmt.Errorf("list %s: %w", p, err)
		}
		for _, m := range mos {
			summary[m.Self.Value] = string(m.Runtime.ConnectionState)
		}
	}
	if len(dss) > 0 {
		var mos []mo.Datastore
		if err := pc.Retrieve(ctx, dss, []string{"summary"}, &mos); err != nil {
			return nil, fmt.Errorf("list %s: %w", p, err)
		}
		for _, m := range mos {
			summary[m.Self.Value] = fmt.Sprintf("%s, %s free of %s", m.Summary.Type, units.Bytes(m.Summary.FreeSpace), units.Bytes(m.Summary.Capacity))
		}
	}
	for i := range out {
		out[i].Summary = summary[out[i].MoRef]
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out, nil
}
