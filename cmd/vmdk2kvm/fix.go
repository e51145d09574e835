package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/pipeline"
)

// fixFlags configure INSPECT → PLAN → FIX (shared by fix, plan and convert --fix).
func fixFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringSliceFlag{Name: "plugin-dir", Usage: "search fixer plugins (vmdk2kvm-fixer-*) here first (repeatable)"},
		&cli.BoolFlag{Name: "no-default-plugin-dirs", Usage: "search only --plugin-dir"},
		&cli.StringSliceFlag{Name: "plugin-sha256", Usage: "pin a plugin binary: NAME=SHA256 (repeatable)"},
		&cli.DurationFlag{Name: "plugin-timeout", Value: 10 * time.Minute, Usage: "kill a plugin that does not answer a call within this time"},
		&cli.StringFlag{Name: "on-fixer-error", Value: pipeline.OnErrorAbort, Usage: "abort (write nothing) or continue (skip the failed fixer)"},
		&cli.StringFlag{Name: "console", Usage: "add console=DEV (e.g. ttyS0) to the guest's kernel command line"},
		&cli.StringFlag{Name: "cloud-init", Usage: "seed cloud-init (NoCloud) with this user-data file"},
		&cli.StringFlag{Name: "report", Usage: "write the fix report to PREFIX.md and PREFIX.json (default: next to the output)"},
		&cli.StringFlag{Name: "guest-helper", Usage: "the vmdk2kvm-guest binary (default: next to vmdk2kvm, then $PATH)"},
		&cli.BoolFlag{Name: "fix-trace", Usage: "show libguestfs and plugin diagnostics on stderr"},
	}
}

func fixOptions(c *cli.Context, dryRun bool) (pipeline.FixOptions, error) {
	o := pipeline.FixOptions{
		Helper:        c.String("guest-helper"),
		PluginDirs:    c.StringSlice("plugin-dir"),
		NoDefaultDirs: c.Bool("no-default-plugin-dirs"),
		Timeout:       c.Duration("plugin-timeout"),
		OnError:       c.String("on-fixer-error"),
		DryRun:        dryRun,
		Options:       map[string]string{},
		Log:           c.App.ErrWriter,
	}
	if c.Bool("fix-trace") {
		o.Trace = c.App.ErrWriter
	}
	for _, kv := range c.StringSlice("plugin-sha256") {
		name, sum, ok := strings.Cut(kv, "=")
		if !ok || name == "" || sum == "" {
			return o, fmt.Errorf("--plugin-sha256 %q: want NAME=SHA256", kv)
		}
		if o.PluginSHA256 == nil {
			o.PluginSHA256 = map[string]string{}
		}
		o.PluginSHA256[strings.TrimPrefix(name, "vmdk2kvm-fixer-")] = sum
	}
	if v := c.String("console"); v != "" {
		o.Options["console"] = v
	}
	if f := c.String("cloud-init"); f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return o, fmt.Errorf("--cloud-init: %w", err)
		}
		o.Options["cloud-init-user-data"] = string(b)
	}
	return o, nil
}

// writeFixReport writes the report files and says where.
func writeFixReport(c *cli.Context, rep *pipeline.FixReport, defaultPrefix string) {
	if rep == nil {
		return
	}
	prefix := c.String("report")
	if prefix == "" {
		prefix = defaultPrefix
	}
	if err := rep.WriteFiles(prefix); err != nil {
		fmt.Fprintf(c.App.ErrWriter, "fix: %v\n", err)
		return
	}
	fmt.Fprintf(c.App.ErrWriter, "fix: report in %s.md and %s.json (%d action(s))\n", prefix, prefix, rep.Actions())
}

func reportOf(err error) *pipeline.FixReport {
	var fe *pipeline.FixError
	if errors.As(err, &fe) {
		return fe.Report
	}
	return nil
}

// fixForConvert runs INSPECT → PLAN → FIX on a copy-on-write overlay of the
// flattened source and returns the overlay for CONVERT. The source is never
// written; on failure nothing is returned and the caller writes no output.
func fixForConvert(c *cli.Context, img block.Device, dst string) (block.Device, error) {
	o, err := fixOptions(c, false)
	if err != nil {
		return nil, err
	}
	cow, err := pipeline.NewFixOverlay(img, filepath.Dir(dst))
	if err != nil {
		return nil, err
	}
	rep, err := pipeline.FixDevice(c.Context, cow, c.Args().Get(0), o)
	if rep == nil {
		rep = reportOf(err)
	}
	writeFixReport(c, rep, dst+".fix-report")
	if err != nil {
		cow.Close()
		return nil, fmt.Errorf("convert %s: fix: %w (no output written)", c.Args().Get(0), err)
	}
	return cow, nil
}

func fixCommand() *cli.Command {
	return &cli.Command{
		Name:      "fix",
		Usage:     "make an existing image's guest boot on KVM (qcow2 or raw; through an overlay committed on success)",
		ArgsUsage: "IMAGE",
		Flags: append(append(sourceFlags(), fixFlags()...),
			&cli.BoolFlag{Name: "dry-run", Aliases: []string{"n"}, Usage: "print the plan; change nothing"},
			&cli.BoolFlag{Name: "json", Usage: "print the report as JSON on stdout"},
		),
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return fmt.Errorf("fix: want IMAGE, got %d arguments", c.NArg())
			}
			return runFix(c, c.Args().Get(0), c.Bool("dry-run"))
		},
	}
}

func planCommand() *cli.Command {
	return &cli.Command{
		Name:      "plan",
		Usage:     "inspect a source disk and print the fixes vmdk2kvm would make (changes nothing)",
		ArgsUsage: "SRC",
		Flags:     append(append(sourceFlags(), fixFlags()...), &cli.BoolFlag{Name: "json", Usage: "print the plan as JSON"}),
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return fmt.Errorf("plan: want SRC, got %d arguments", c.NArg())
			}
			return runFix(c, c.Args().Get(0), true)
		},
	}
}

func runFix(c *cli.Context, image string, dryRun bool) error {
	o, err := fixOptions(c, dryRun)
	if err != nil {
		return err
	}
	img, err := sourcesFor(c).Open(c.Context, image, sourceOptions(c))
	if err != nil {
		return err
	}
	format := img.Info.Format
	var rep *pipeline.FixReport
	switch {
	case dryRun:
		// Any source: exported read-only over NBD to the guest helper.
		rep, err = pipeline.FixDevice(c.Context, img, image, o)
		img.Close()
	case format == "qcow2" || format == "raw":
		img.Close()
		rep, err = pipeline.FixImage(c.Context, image, o)
	default:
		img.Close()
		return fmt.Errorf("fix %s: %s images are fixed on conversion (vmdk2kvm convert --fix); fix changes qcow2 or raw images", image, format)
	}
	if rep == nil {
		rep = reportOf(err)
	}
	if rep != nil {
		if c.Bool("json") {
			j, jerr := rep.JSON()
			if jerr == nil {
				fmt.Fprintln(c.App.Writer, string(j))
			}
		} else {
			fmt.Fprint(c.App.Writer, rep.Markdown())
		}
		if !dryRun || c.String("report") != "" {
			writeFixReport(c, rep, image+".fix-report")
		}
	}
	if err != nil {
		if dryRun {
			return fmt.Errorf("plan %s: %w", image, err)
		}
		return fmt.Errorf("fix %s: %w (the image is unchanged)", image, err)
	}
	return nil
}
