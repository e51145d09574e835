package vmware

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"sort"
	"strings"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// URI is a parsed vsphere://[user@]vcenter[:port]/DC/vm/[FOLDER/]NAME.
type URI struct {
	User       string // "" when not given
	Server     string // host[:port]
	Datacenter string
	// Path is the VM's inventory path, "/DC/vm/.../NAME".
	Path string
}

// ParseURI parses a vsphere:// URI. A password in it is refused.
func ParseURI(s string) (*URI, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("vsphere URI %q: %w", s, err)
	}
	if u.Scheme != "vsphere" {
		return nil, fmt.Errorf("vsphere URI %q: want vsphere://[user@]vcenter/DC/vm/NAME", s)
	}
	out := &URI{Server: u.Host}
	if u.User != nil {
		if _, ok := u.User.Password(); ok {
			return nil, errors.New("vsphere URI must not carry a password: use --password-file, VMDK2KVM_PASSWORD or the prompt")
		}
		out.User = u.User.Username()
	}
	if out.Server == "" {
		return nil, fmt.Errorf("vsphere URI %q has no vCenter host", s)
	}
	parts := strings.Split(strings.Trim(u.Path, "/"), "/")
	if len(parts) < 3 || parts[1] != "vm" || parts[0] == "" || parts[len(parts)-1] == "" {
		return nil, fmt.Errorf("vsphere URI %q: the path must be /DATACENTER/vm/[FOLDER/]NAME", s)
	}
	out.Datacenter = parts[0]
	out.Path = "/" + strings.Join(parts, "/")
	return out, nil
}

// VM is a found virtual machine.
type VM struct {
	Ref        types.ManagedObjectReference
	Name       string
	Path       string // inventory path
	Datacenter string // its datacenter's name
	DCPath     string // its datacenter's inventory path (dcPath of /folder URLs)
}

// Object is the govmomi object for the VM.
func (c *Client) Object(vm *VM) *object.VirtualMachine {
	return object.NewVirtualMachine(c.vim, vm.Ref)
}

var (
	morefRe = regexp.MustCompile(`^(VirtualMachine:)?vm-\d+$`)
	uuidRe  = regexp.MustCompile(`^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$`)
)

// FindVM finds a VM by MoRef (vm-42), BIOS or instance UUID, inventory path
// (/DC/vm/NAME) or name (unique across datacenters).
func (c *Client) FindVM(ctx context.Context, spec string) (*VM, error) {
	spec = strings.TrimSpace(spec)
	if spec == "" {
		return nil, errors.New("no VM given")
	}
	var refs []types.ManagedObjectReference
	switch {
	case morefRe.MatchString(spec):
		ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: strings.TrimPrefix(spec, "VirtualMachine:")}
		var m mo.ManagedEntity
		if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, ref, []string{"name"}, &m); err != nil {
			if isFault[*types.ManagedObjectNotFound](err) {
				return nil, fmt.Errorf("%w: VM %s on %s", ErrNotFound, spec, c.Host())
			}
			return nil, fmt.Errorf("VM %s: %w", spec, err)
		}
		refs = append(refs, ref)
	case uuidRe.MatchString(spec):
		si := object.NewSearchIndex(c.vim)
		for _, instance := range []bool{false, true} {
			ref, err := si.FindByUuid(ctx, nil, formatUUID(spec), true, &instance)
			if err != nil {
				return nil, fmt.Errorf("find VM by UUID %s: %w", spec, err)
			}
			if ref != nil {
				refs = append(refs, ref.Reference())
				break
			}
		}
	case strings.Contains(spec, "/"):
		p := spec
		if !strings.HasPrefix(p, "/") {
			p = "/" + p
		}
		vm, err := find.NewFinder(c.vim, false).VirtualMachine(ctx, p)
		if err != nil {
			var nf *find.NotFoundError
			if errors.As(err, &nf) {
				break
			}
			return nil, fmt.Errorf("find VM %s: %w", spec, err)
		}
		refs = append(refs, vm.Reference())
	default:
		var err error
		refs, err = c.vmsNamed(ctx, spec)
		if err != nil {
			return nil, err
		}
	}
	if len(refs) == 0 {
		return nil, fmt.Errorf("%w: no VM %q on %s", ErrNotFound, spec, c.Host())
	}
	var vms []*VM
	for _, r := range refs {
		vm, err := c.describeRef(ctx, r)
		if err != nil {
			return nil, err
		}
		vms = append(vms, vm)
	}
	if len(vms) > 1 {
		var paths []string
		for _, v := range vms {
			paths = append(paths, v.Path)
		}
		sort.Strings(paths)
		return nil, fmt.Errorf("VM name %q is ambiguous on %s: %s (give an inventory path)", spec, c.Host(), strings.Join(paths, ", "))
	}
	return vms[0], nil
}

func formatUUID(s string) string {
	h := strings.ToLower(strings.ReplaceAll(s, "-", ""))
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func (c *Client) vmsNamed(ctx context.Context, name string) ([]types.ManagedObjectReference, error) {
	m := view.NewManager(c.vim)
	v, err := m.CreateContainerView(ctx, c.vim.ServiceContent.RootFolder, []string{"VirtualMachine"}, true)
	if err != nil {
		return nil, fmt.Errorf("list VMs: %w", err)
	}
	defer v.Destroy(context.WithoutCancel(ctx))
	var vms []mo.VirtualMachine
	if err := v.RetrieveWithFilter(ctx, []string{"VirtualMachine"}, []string{"name"}, &vms, property.Match{"name": name}); err != nil {
		if isNotFoundFilter(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("find VM %q: %w", name, err)
	}
	var refs []types.ManagedObjectReference
	for _, vm := range vms {
		if vm.Name == name { // Match is a pattern match; keep exact names
			refs = append(refs, vm.Self)
		}
	}
	return refs, nil
}

func isNotFoundFilter(err error) bool {
	return err != nil && strings.Contains(err.Error(), "object references is empty")
}

// describeRef fills a VM's name, inventory path and datacenter.
func (c *Client) describeRef(ctx context.Context, ref types.ManagedObjectReference) (*VM, error) {
	ancestors, err := mo.Ancestors(ctx, c.vim, c.vim.ServiceContent.PropertyCollector, ref)
	if err != nil {
		return nil, fmt.Errorf("inventory path of %s: %w", ref.Value, err)
	}
	vm := &VM{Ref: ref}
	var names []string
	for i, a := range ancestors {
		if i == 0 { // the root folder
			continue
		}
		names = append(names, a.Name)
		if a.Self.Type == "Datacenter" {
			vm.Datacenter = a.Name
			vm.DCPath = strings.Join(names, "/")
		}
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("%s has no inventory path", ref.Value)
	}
	vm.Name = names[len(names)-1]
	vm.Path = "/" + strings.Join(names, "/")
	return vm, nil
}
