package main

import (
	"encoding/json"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/internal/units"
	"io"
	"sort"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

func sourceFlags() []cli.Flag {
	return append([]cli.Flag{
		&cli.StringFlag{Name: "format", Aliases: []string{"f"}, Usage: "source format (default: probe)"},
		&cli.BoolFlag{Name: "allow-stale-chain", Usage: "open a snapshot chain whose parent changed after the child was made"},
	}, remoteFlags()...)
}

func sourceOptions(c *cli.Context) sources.Options {
	return sources.Options{Format: c.String("format"), AllowStaleChain: c.Bool("allow-stale-chain")}
}

type infoJSON struct {
	sources.Info
	Allocated int64          `json:"allocated_bytes"`
	Map       []extentJSON   `json:"map,omitempty"`
	Remote    map[string]any `json:"remote,omitempty"` // https/ssh transport and cache counters
}

type extentJSON struct {
	Off  int64  `json:"offset"`
	Len  int64  `json:"length"`
	Type string `json:"type"`
}

func infoCommand() *cli.Command {
	return &cli.Command{
		Name:      "info",
		Usage:     "describe a disk image: format, size, allocation, snapshot chain",
		ArgsUsage: "SRC",
		Flags: append(sourceFlags(),
			&cli.BoolFlag{Name: "map", Usage: "print the extent map"},
			&cli.BoolFlag{Name: "json", Usage: "machine-readable output"},
		),
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return fmt.Errorf("info: want exactly one SRC, got %d arguments", c.NArg())
			}
			reg, remote := sourcesWithStats(c)
			img, err := reg.Open(c.Context, c.Args().First(), sourceOptions(c))
			if err != nil {
				return err
			}
			defer img.Close()
			out := infoJSON{Info: img.Info}
			err = block.Walk(c.Context, img, 0, img.Size(), 0, func(e block.Extent) error {
				if e.Type != block.Hole {
					out.Allocated += e.Len
				}
				if c.Bool("map") {
					out.Map = append(out.Map, extentJSON{e.Off, e.Len, e.Type.String()})
				}
				return nil
			})
			if err != nil {
				return err
			}
			if c.Bool("json") {
				out.Remote = remote()
				enc := json.NewEncoder(c.App.Writer)
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			}
			return printInfo(c.App.Writer, c.Args().First(), out)
		},
	}
}

func printInfo(w io.Writer, name string, in infoJSON) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "image:\t%s\n", name)
	fmt.Fprintf(tw, "format:\t%s\n", in.Format)
	fmt.Fprintf(tw, "virtual size:\t%s (%d bytes)\n", units.Bytes(in.VirtualSize), in.VirtualSize)
	fmt.Fprintf(tw, "allocated:\t%s (%d bytes)\n", units.Bytes(in.Allocated), in.Allocated)
	keys := make([]string, 0, len(in.Props))
	for k := range in.Props {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(tw, "%s:\t%s\n", k, in.Props[k])
	}
	tw.Flush()
	if len(in.Layers) > 0 {
		fmt.Fprintln(w, "layers (top first):")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  #\tFILE\tFORMAT\tID\tPARENT\tALLOCATED")
		for i, l := range in.Layers {
			f := l.Format
			if l.Subformat != "" {
				f += "/" + l.Subformat
			}
			fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%s\t%s\n", i, l.File, f, dash(l.ID), dash(l.Parent), units.Bytes(l.Allocated))
		}
		tw.Flush()
	}
	if len(in.Map) > 0 {
		fmt.Fprintln(w, "map:")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "OFFSET\tLENGTH\tTYPE\t")
		for _, e := range in.Map {
			fmt.Fprintf(tw, "%d\t%d\t%s\t\n", e.Off, e.Len, e.Type)
		}
		tw.Flush()
	}
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// human prints a byte count for people (see internal/units).
func human(n int64) string { return units.Bytes(n) }
