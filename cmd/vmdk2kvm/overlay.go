package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/vmdk2kvm/vmdk2kvm/qcow2"
)

// overlayCommand creates and commits qcow2 overlays (the fix stage writes
// into one so the synced replica stays pristine).
func overlayCommand() *cli.Command {
	return &cli.Command{
		Name:  "overlay",
		Usage: "create a qcow2 overlay over a base image, or commit one into its base",
		Subcommands: []*cli.Command{
			{
				Name:      "create",
				Usage:     "create an empty qcow2 overlay whose backing file is BASE (qcow2 or raw)",
				ArgsUsage: "BASE OVERLAY",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "backing-format", Aliases: []string{"F"}, Usage: "qcow2 or raw (default: probed)"},
				},
				Action: func(c *cli.Context) error {
					if c.NArg() != 2 {
						return fmt.Errorf("overlay create: want BASE and OVERLAY, got %d arguments", c.NArg())
					}
					return qcow2.CreateOverlay(c.Args().Get(1), c.Args().Get(0), c.String("backing-format"))
				},
			},
			{
				Name:      "commit",
				Usage:     "write the clusters OVERLAY holds into its backing file, in place",
				ArgsUsage: "OVERLAY",
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return fmt.Errorf("overlay commit: want OVERLAY, got %d arguments", c.NArg())
					}
					n, err := qcow2.Commit(c.Context, c.Args().Get(0))
					if err != nil {
						return err
					}
					_, err = fmt.Fprintf(c.App.ErrWriter, "overlay commit: %s committed into the backing file\n", human(n))
					return err
				},
			},
		},
	}
}
