package main

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/urfave/cli/v2"

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
