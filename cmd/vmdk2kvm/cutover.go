package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vmdk2kvm/vmdk2kvm/cbt"
	"github.com/vmdk2kvm/vmdk2kvm/domain"
	"github.com/vmdk2kvm/vmdk2kvm/pipeline"
)

func cutoverCommand() *cli.Command {
	return &cli.Command{
		Name:      "cutover",
		Usage:     "warm migration: shut the VM down, run the final round, fix the guest on an overlay, write the libvirt domain, report the downtime",
		ArgsUsage: "vsphere://[user@]vcenter/DC/vm/[FOLDER/]NAME",
		Flags: append(append(warmFlags(), fixFlags()...),
			&cli.DurationFlag{Name: "shutdown-timeout", Value: 5 * time.Minute, Usage: "how long to wait for the guest to shut down through VMware Tools"},
			&cli.BoolFlag{Name: "force", Usage: "power the VM off when the guest does not shut down in time (or has no Tools)"},
			&cli.BoolFlag{Name: "no-fix", Usage: "skip the fix stage (the overlay stays as the final round left it)"},
			&cli.StringSliceFlag{Name: "network-map", Usage: "map a vSphere network to a libvirt network: VSPHERE=LIBVIRT (repeatable)"},
			&cli.BoolFlag{Name: "sata", Usage: "disks on SATA instead of virtio-blk (first boot of guests without virtio drivers)"},
			&cli.StringFlag{Name: "domain-type", Value: "auto", Usage: "kvm, qemu (TCG), or auto (probe /dev/kvm)"},
			&cli.StringFlag{Name: "name", Usage: "domain name (default: the VM's)"},
		),
		Action: func(c *cli.Context) error {
			w, err := openWarm(c, false)
			if err != nil {
				return err
			}
			defer w.close()
			cfg := pipeline.CutoverConfig{
				Syncer: w.syncer, Source: w.src,
				ShutdownTimeout: c.Duration("shutdown-timeout"), Force: c.Bool("force"),
				SkipFixReason: "--no-fix",
			}
			if !c.Bool("no-fix") {
				o, err := fixOptions(c, false)
				if err != nil {
					return err
				}
				cfg.Fix = func(ctx context.Context, overlay string) (string, error) {
					rep, err := pipeline.FixImage(ctx, overlay, o)
					if rep == nil {
						rep = reportOf(err)
					}
					writeFixReport(c, rep, overlay+".fix-report")
					if rep == nil {
						return "", err
					}
					return fmt.Sprintf("%d fixer(s), %d action(s)", len(rep.Plugins), rep.Actions()), err
				}
			}
			cfg.Domain = func(ctx context.Context, overlays map[string]string) (string, error) {
				return cutoverDomain(c, w, overlays)
			}
			rep, err := pipeline.Cutover(c.Context, cfg)
			if rep != nil {
				j, h, werr := rep.Write(c.String("target"), "cutover-report")
				if werr == nil {
					fmt.Fprint(c.App.ErrWriter, rep.Summary())
					fmt.Fprintf(c.App.ErrWriter, "cutover: report in %s and %s\n", j, h)
				}
			}
			if err != nil {
				return err
			}
			st := w.syncer.State
			fmt.Fprintf(c.App.ErrWriter, "cutover: done; downtime %.2fs; boot %s with: virsh define %s\n",
				st.Cutover.DowntimeSeconds, filepath.Join(c.String("target"), st.Cutover.Overlays[0]),
				filepath.Join(c.String("target"), st.Cutover.DomainXML))
			return nil
		},
	}
}

// cutoverDomain maps the VM to a libvirt domain (package domain) whose disks
// are the cutover overlays, and writes it into the target folder.
func cutoverDomain(c *cli.Context, w *warm, overlays map[string]string) (string, error) {
	nm, err := domain.ParseNetworkMap(c.StringSlice("network-map"))
	if err != nil {
		return "", err
	}
	typ := c.String("domain-type")
	if typ == "auto" {
		typ = ""
	}
	o := domain.Options{Name: c.String("name"), Type: typ, NetworkMap: nm, SATA: c.Bool("sata"), DiskFormat: "qcow2",
		DiskPaths: map[int32]string{}}
	for k, p := range overlays {
		key, err := strconv.Atoi(k)
		if err != nil {
			return "", fmt.Errorf("disk key %q is not a vSphere device key", k)
		}
		o.DiskPaths[int32(key)] = p
	}
	info, err := w.client.Info(c.Context, w.vm)
	if err != nil {
		return "", err
	}
	res, err := domain.Build(info, o)
	if err != nil {
		return "", err
	}
	for _, warn := range res.Warnings {
		fmt.Fprintf(c.App.ErrWriter, "cutover: warning: %s\n", warn)
	}
	x, err := res.Domain.Marshal()
	if err != nil {
		return "", err
	}
	p := filepath.Join(c.String("target"), res.Domain.Name+".xml")
	return p, cbt.WriteFileAtomic(p, []byte(x+"\n"), 0o644)
}
