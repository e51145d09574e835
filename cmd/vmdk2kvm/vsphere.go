package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/vmdk2kvm/vmdk2kvm/domain"
	"github.com/vmdk2kvm/vmdk2kvm/vmware"
)

// Environment variables of the vSphere commands (passwords never come from argv).
const (
	vcenterEnv    = "VMDK2KVM_VCENTER"
	vsphereUser   = "VMDK2KVM_USER"
	vspherePWEnv  = "VMDK2KVM_PASSWORD"
	vsphereScheme = "vsphere://"
)

func vsphereConnFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "vcenter", EnvVars: []string{vcenterEnv}, Usage: "vCenter or ESXi address or URL (or the host of a vsphere:// URI)"},
		&cli.StringFlag{Name: "user", EnvVars: []string{vsphereUser}, Usage: "vSphere user (or user@ in a vsphere:// URI)"},
		&cli.StringFlag{Name: "password-file", Usage: "read the password from this file (else $" + vspherePWEnv + ", else a prompt)"},
		&cli.StringFlag{Name: "thumbprint", Usage: "trust the server whose certificate has this SHA-1 or SHA-256 thumbprint"},
		&cli.BoolFlag{Name: "insecure", Usage: "do not verify the server's certificate (unsafe; prefer --thumbprint)"},
		&cli.BoolFlag{Name: "json", Usage: "machine-readable output"},
	}
}

// vsphereCommand groups the control-plane commands.
func vsphereCommand() *cli.Command {
	leaf := func(cmd *cli.Command) *cli.Command {
		cmd.Flags = append(vsphereConnFlags(), cmd.Flags...)
		cmd.Action = interspersed(cmd.Action)
		return cmd
	}
	return &cli.Command{
		Name:  "vsphere",
		Usage: "vSphere inventory, VM details, snapshots, CBT, data paths, libvirt domain XML",
		Subcommands: []*cli.Command{
			leaf(&cli.Command{Name: "ls", Usage: "list an inventory folder", ArgsUsage: "[PATH]", Action: vsphereLs}),
			leaf(&cli.Command{Name: "info", Usage: "describe a VM: hardware, disks and their chains, CBT, snapshots", ArgsUsage: "VM", Action: vsphereInfo}),
			leaf(&cli.Command{Name: "disks", Usage: "where each disk can be read (/folder URLs, ssh path, VDDK)", ArgsUsage: "VM",
				Flags: []cli.Flag{&cli.StringFlag{Name: "snapshot", Usage: "at this snapshot (name or MoRef) instead of the current state"}}, Action: vsphereDisks}),
			{
				Name: "snapshot", Usage: "create, remove or list snapshots",
				Subcommands: []*cli.Command{
					leaf(&cli.Command{Name: "create", ArgsUsage: "VM NAME", Usage: "take a snapshot (memory off)", Flags: []cli.Flag{
						&cli.StringFlag{Name: "description"}, &cli.BoolFlag{Name: "quiesce", Usage: "quiesce the guest file systems (needs VMware Tools)"},
						&cli.BoolFlag{Name: "memory", Usage: "include the memory"},
					}, Action: vsphereSnapCreate}),
					leaf(&cli.Command{Name: "remove", ArgsUsage: "VM NAME|MOREF", Usage: "remove a snapshot, merging it into its parent", Flags: []cli.Flag{
						&cli.BoolFlag{Name: "children", Usage: "remove its children too"},
						&cli.BoolFlag{Name: "no-consolidate", Usage: "do not consolidate the disks afterwards"},
					}, Action: vsphereSnapRemove}),
					leaf(&cli.Command{Name: "list", ArgsUsage: "VM", Usage: "print the snapshot tree", Action: vsphereSnapList}),
				},
			},
			{
				Name: "cbt", Usage: "changed block tracking",
				Subcommands: []*cli.Command{
					leaf(&cli.Command{Name: "enable", ArgsUsage: "VM", Usage: "enable CBT, with a stun (snapshot create+remove) on a running VM", Flags: []cli.Flag{
						&cli.BoolFlag{Name: "yes", Usage: "consent to reconfiguring the VM and to the stun snapshot"},
						&cli.BoolFlag{Name: "no-stun", Usage: "do not stun: CBT takes effect at the next snapshot, vMotion or power cycle"},
					}, Action: vsphereCBTEnable}),
				},
			},
			leaf(&cli.Command{Name: "domain-xml", ArgsUsage: "VM", Usage: "print a libvirt domain for the VM", Flags: domainFlags(), Action: vsphereDomainXML}),
			leaf(&cli.Command{Name: "plan", ArgsUsage: "VM|vsphere://[user@]vcenter/DC/vm/NAME", Usage: "plan the migration of a VM (changes nothing)",
				Flags: vspherePlanFlags(), Action: vspherePlan}),
		},
	}
}

func domainFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringSliceFlag{Name: "network-map", Usage: "map a vSphere network to a libvirt network: VSPHERE=LIBVIRT (repeatable)"},
		&cli.BoolFlag{Name: "sata", Usage: "disks on SATA instead of virtio-blk (first boot of guests without virtio drivers)"},
		&cli.StringFlag{Name: "domain-type", Value: "auto", Usage: "kvm, qemu (TCG), or auto (probe /dev/kvm)"},
		&cli.StringFlag{Name: "name", Usage: "domain name (default: the VM's)"},
		&cli.StringFlag{Name: "output-dir", Value: ".", Usage: "folder of the converted disks"},
		&cli.StringFlag{Name: "output-format", Aliases: []string{"O"}, Value: "qcow2", Usage: "format of the converted disks"},
	}
}

// interspersed lets flags follow arguments ("cbt enable VM --yes"): the
// standard flag parser stops at the first argument and leaves them there.
func interspersed(action cli.ActionFunc) cli.ActionFunc {
	return func(c *cli.Context) error {
		args := c.Args().Slice()
		var rest []string
		for i := 0; i < len(args); i++ {
			a := args[i]
			if a == "--" {
				rest = append(rest, args[i+1:]...)
				break
			}
			if len(a) < 2 || a[0] != '-' {
				rest = append(rest, a)
				continue
			}
			name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
			f := findFlag(c.Command.Flags, name)
			if f == nil {
				return fmt.Errorf("%s: unknown flag %s", c.Command.FullName(), a)
			}
			if _, isBool := f.(*cli.BoolFlag); isBool && !hasVal {
				val = "true"
			} else if !hasVal {
				if i+1 >= len(args) {
					return fmt.Errorf("%s: flag %s needs a value", c.Command.FullName(), a)
				}
				i++
				val = args[i]
			}
			if err := c.Set(f.Names()[0], val); err != nil {
				return fmt.Errorf("%s: flag %s: %w", c.Command.FullName(), a, err)
			}
		}
		// urfave's Context has no setter for Args: the cleaned arguments
		// ride on the context.Context (argsOf reads them).
		c.Context = context.WithValue(c.Context, argsKey{}, rest)
		return action(c)
	}
}

func findFlag(flags []cli.Flag, name string) cli.Flag {
	for _, f := range flags {
		for _, n := range f.Names() {
			if n == name {
				return f
			}
		}
	}
	return nil
}

// argsOf returns the positional arguments, after interspersed flags were
// taken out.
func argsOf(c *cli.Context) []string {
	if a, ok := c.Context.Value(argsKey{}).([]string); ok {
		return a
	}
	return c.Args().Slice()
}

type argsKey struct{}

// vsphereConnect logs in with the flags, the environment and an optional
// vsphere:// URI (which may give the server and the user).
func vsphereConnect(c *cli.Context, uri *vmware.URI) (*vmware.Client, error) {
	server, user := c.String("vcenter"), c.String("user")
	if uri != nil {
		if server == "" {
			server = uri.Server
		}
		if user == "" {
			user = uri.User
		}
	}
	if server == "" {
		return nil, errors.New("no vCenter: give --vcenter, $" + vcenterEnv + " or a vsphere:// URI")
	}
	if user == "" {
		return nil, errors.New("no vSphere user: give --user, $" + vsphereUser + " or user@ in the vsphere:// URI")
	}
	if c.Bool("insecure") {
		fmt.Fprintln(c.App.ErrWriter, "vmdk2kvm: warning: --insecure: the server's certificate is not verified")
	}
	pw, err := vspherePassword(c, user, server)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(c.Context, 2*time.Minute)
	defer cancel()
	return vmware.Connect(ctx, vmware.Config{URL: server, User: user, Password: pw, Thumbprint: c.String("thumbprint"), Insecure: c.Bool("insecure")})
}

// vspherePassword reads --password-file, $VMDK2KVM_PASSWORD, or prompts on
// the terminal.
func vspherePassword(c *cli.Context, user, server string) (string, error) {
	if f := c.String("password-file"); f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", fmt.Errorf("--password-file: %w", err)
		}
		return strings.TrimRight(string(b), "\r\n"), nil
	}
	if p, ok := os.LookupEnv(vspherePWEnv); ok {
		return p, nil
	}
	tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
	if err != nil {
		return "", errors.New("a password is needed: give it with --password-file or $" + vspherePWEnv + " (no terminal to prompt on)")
	}
	defer tty.Close()
	if !term.IsTerminal(int(tty.Fd())) {
		return "", errors.New("a password is needed: give it with --password-file or $" + vspherePWEnv + " (no terminal to prompt on)")
	}
	fmt.Fprintf(tty, "password for %s@%s: ", user, server)
	b, err := term.ReadPassword(int(tty.Fd()))
	fmt.Fprintln(tty)
	if err != nil {
		return "", fmt.Errorf("reading the password: %w", err)
	}
	return string(b), nil
}

// vsphereVM connects and finds the VM named by the first argument (a
// name, path, MoRef, UUID or vsphere:// URI).
func vsphereVM(c *cli.Context, args []string, want int) (*vmware.Client, *vmware.VM, error) {
	if len(args) != want {
		return nil, nil, fmt.Errorf("%s: want %s, got %d arguments", c.Command.FullName(), c.Command.ArgsUsage, len(args))
	}
	spec := args[0]
	var uri *vmware.URI
	if strings.HasPrefix(spec, vsphereScheme) {
		u, err := vmware.ParseURI(spec)
		if err != nil {
			return nil, nil, err
		}
		uri, spec = u, u.Path
	}
	cl, err := vsphereConnect(c, uri)
	if err != nil {
		return nil, nil, err
	}
	vm, err := cl.FindVM(c.Context, spec)
	if err != nil {
		cl.Close(context.WithoutCancel(c.Context))
		return nil, nil, err
	}
	return cl, vm, nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func vsphereLs(c *cli.Context) error {
	args := argsOf(c)
	if len(args) > 1 {
		return fmt.Errorf("vsphere ls: want at most one PATH, got %d arguments", len(args))
	}
	cl, err := vsphereConnect(c, nil)
	if err != nil {
		return err
	}
	defer cl.Close(context.WithoutCancel(c.Context))
	p := "/"
	if len(args) == 1 {
		p = args[0]
	}
	es, err := cl.List(c.Context, p)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, es)
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tTYPE\tMOREF\tSUMMARY")
	for _, e := range es {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", e.Name, e.Type, e.MoRef, dash(e.Summary))
	}
	return tw.Flush()
}

func vsphereInfo(c *cli.Context) error {
	cl, vm, err := vsphereVM(c, argsOf(c), 1)
	if err != nil {
		return err
	}
	defer cl.Close(context.WithoutCancel(c.Context))
	info, err := cl.Info(c.Context, vm)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, info)
	}
	return printVMInfo(c.App.Writer, info)
}

func printVMInfo(w io.Writer, in *vmware.VMInfo) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fw := in.Firmware
	if in.SecureBoot {
		fw += " (secure boot)"
	}
	onOff := map[bool]string{true: "on", false: "off"}
	for _, kv := range [][2]string{
		{"name", in.Name}, {"path", in.Path}, {"moref", in.MoRef}, {"uuid", in.UUID}, {"instance uuid", in.InstanceUUID},
		{"power", in.PowerState}, {"host", in.Host}, {"guest", in.GuestID + " " + in.GuestFullName},
		{"firmware", fw}, {"hardware", in.HardwareVersion},
		{"cpus", fmt.Sprintf("%d (%d per socket)", in.CPUs, in.CoresPerSocket)}, {"memory", human(in.MemoryMiB << 20)},
		{"cbt", onOff[in.CBT] + map[bool]string{true: "", false: " (not supported)"}[in.CBTSupported]},
		{"vmx", in.VMXPath},
	} {
		fmt.Fprintf(tw, "%s:\t%s\n", kv[0], strings.TrimSpace(kv[1]))
	}
	tw.Flush()
	fmt.Fprintln(w, "\nNICs:")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  LABEL\tADAPTER\tMAC\tNETWORK\tCONNECTED")
	for _, n := range in.NICs {
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%v\n", n.Label, n.Adapter, n.MAC, n.Network, n.Connected)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nDisks:")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  ADDRESS\tCONTROLLER\tSIZE\tPROVISIONING\tMODE\tCBT\tFILE")
	for _, d := range in.Disks {
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\n", dash(d.Address), d.ControllerType, human(d.CapacityBytes), d.Provisioning, d.Mode, onOff[d.CBT], d.File)
		for i, l := range d.Chain {
			fmt.Fprintf(tw, "  \t\t\t\t\t%s\t%s %s\n", strings.Repeat(" ", i)+"└", l.Type, strings.Join(l.DataFiles, ", "))
		}
		if d.ChangeID != "" {
			fmt.Fprintf(tw, "  \t\t\t\t\t\tchange id %s\n", d.ChangeID)
		}
	}
	tw.Flush()
	if len(in.Snapshots) > 0 {
		fmt.Fprintln(w, "\nSnapshots:")
		printSnapshots(w, in.Snapshots)
	}
	return nil
}

func printSnapshots(w io.Writer, tree []vmware.Snapshot) {
	flat, depth := vmware.FlattenSnapshots(tree)
	for i, s := range flat {
		cur := ""
		if s.Current {
			cur = "  <- current"
		}
		fmt.Fprintf(w, "  %s%s (%s, %s, %s)%s\n", strings.Repeat("  ", depth[i]), s.Name, s.MoRef, s.Created.UTC().Format(time.RFC3339), s.PowerState, cur)
	}
}

func vsphereDisks(c *cli.Context) error {
	cl, vm, err := vsphereVM(c, argsOf(c), 1)
	if err != nil {
		return err
	}
	defer cl.Close(context.WithoutCancel(c.Context))
	ps, err := cl.ResolveDisks(c.Context, vm, c.String("snapshot"))
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, ps)
	}
	for _, p := range ps {
		fmt.Fprintf(c.App.Writer, "%s (%s, %s on %s %s): read via %s\n", p.Address, p.Label, human(p.CapacityBytes), p.Datastore, p.DatastoreType, p.Method)
		for _, l := range p.Layers {
			fmt.Fprintf(c.App.Writer, "  %-10s %s\n", l.Type, l.File)
			for _, u := range l.DataURLs {
				fmt.Fprintf(c.App.Writer, "             %s\n", u)
			}
		}
		if p.SSH != "" {
			fmt.Fprintf(c.App.Writer, "  ssh        %s\n", p.SSH)
		}
		if p.HostURL != "" && p.Pinned {
			fmt.Fprintf(c.App.Writer, "  pinned     %s\n", p.HostURL)
		}
		for _, w := range p.Warnings {
			fmt.Fprintf(c.App.Writer, "  ! %s\n", w)
		}
	}
	return nil
}

func vsphereSnapCreate(c *cli.Context) error {
	args := argsOf(c)
	cl, vm, err := vsphereVM(c, args, 2)
	if err != nil {
		return err
	}
	defer cl.Close(context.WithoutCancel(c.Context))
	ref, err := cl.CreateSnapshot(c.Context, vm, args[1], vmware.SnapshotOptions{Description: c.String("description"), Quiesce: c.Bool("quiesce"), Memory: c.Bool("memory")})
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, map[string]string{"vm": vm.Name, "snapshot": args[1], "moref": ref})
	}
	_, err = fmt.Fprintf(c.App.Writer, "created snapshot %q (%s) of %s\n", args[1], ref, vm.Path)
	return err
}

func vsphereSnapRemove(c *cli.Context) error {
	args := argsOf(c)
	cl, vm, err := vsphereVM(c, args, 2)
	if err != nil {
		return err
	}
	defer cl.Close(context.WithoutCancel(c.Context))
	if err := cl.RemoveSnapshot(c.Context, vm, args[1], c.Bool("children"), !c.Bool("no-consolidate")); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, map[string]string{"vm": vm.Name, "removed": args[1]})
	}
	_, err = fmt.Fprintf(c.App.Writer, "removed snapshot %q of %s\n", args[1], vm.Path)
	return err
}

func vsphereSnapList(c *cli.Context) error {
	cl, vm, err := vsphereVM(c, argsOf(c), 1)
	if err != nil {
		return err
	}
	defer cl.Close(context.WithoutCancel(c.Context))
	tree, cur, err := cl.Snapshots(c.Context, vm)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, map[string]any{"vm": vm.Name, "current": cur, "snapshots": tree})
	}
	if len(tree) == 0 {
		_, err = fmt.Fprintf(c.App.Writer, "%s has no snapshots\n", vm.Path)
		return err
	}
	printSnapshots(c.App.Writer, tree)
	return nil
}

func vsphereCBTEnable(c *cli.Context) error {
	args := argsOf(c)
	if !c.Bool("yes") {
		return errors.New("vsphere cbt enable reconfigures the VM and, if it runs, takes and removes a snapshot (a short stun): rerun with --yes to consent")
	}
	cl, vm, err := vsphereVM(c, args, 1)
	if err != nil {
		return err
	}
	defer cl.Close(context.WithoutCancel(c.Context))
	res, err := cl.EnableCBT(c.Context, vm, !c.Bool("no-stun"))
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, res)
	}
	fmt.Fprintf(c.App.Writer, "CBT enabled on %s for %s; effective %s\n", vm.Path, strings.Join(res.Disks, ", "), res.Effective)
	for _, s := range res.Skipped {
		fmt.Fprintf(c.App.Writer, "  skipped %s\n", s)
	}
	return nil
}

func domainOptions(c *cli.Context) (domain.Options, error) {
	nm, err := domain.ParseNetworkMap(c.StringSlice("network-map"))
	if err != nil {
		return domain.Options{}, err
	}
	typ := c.String("domain-type")
	if typ == "auto" {
		typ = ""
	}
	return domain.Options{Name: c.String("name"), Type: typ, NetworkMap: nm, SATA: c.Bool("sata"), Dir: c.String("output-dir"), DiskFormat: c.String("output-format")}, nil
}

func vsphereDomainXML(c *cli.Context) error {
	o, err := domainOptions(c)
	if err != nil {
		return err
	}
	cl, vm, err := vsphereVM(c, argsOf(c), 1)
	if err != nil {
		return err
	}
	defer cl.Close(context.WithoutCancel(c.Context))
	info, err := cl.Info(c.Context, vm)
	if err != nil {
		return err
	}
	res, err := domain.Build(info, o)
	if err != nil {
		return err
	}
	xml, err := res.Domain.Marshal()
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, map[string]any{"xml": xml, "disks": res.Disks, "warnings": res.Warnings})
	}
	for _, w := range res.Warnings {
		fmt.Fprintf(c.App.ErrWriter, "vmdk2kvm: warning: %s\n", w)
	}
	_, err = fmt.Fprintln(c.App.Writer, xml)
	return err
}
