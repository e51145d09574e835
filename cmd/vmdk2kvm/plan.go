package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/vmdk2kvm/vmdk2kvm/pipeline"
)

// vspherePlanFlags are the flags of planning a vSphere VM (besides the
// connection flags).
func vspherePlanFlags() []cli.Flag {
	return append(domainFlags(),
		&cli.StringFlag{Name: "snapshot", Usage: "plan reading this snapshot (name or MoRef) instead of the current state"},
		&cli.StringFlag{Name: "rate", Value: "100MiB", Usage: "copy rate the time estimates assume, per second (e.g. 250MiB, 1GiB)"},
		&cli.BoolFlag{Name: "yaml", Usage: "print the plan as YAML"},
		&cli.StringFlag{Name: "save", Usage: "also write the plan to this file (.json, .yaml or .yml) for sync/convert"},
	)
}

// withVSpherePlan makes an existing "plan" command also take vsphere://
// URIs: those are planned here, everything else goes to its own action.
func withVSpherePlan(cmd *cli.Command) *cli.Command {
	for _, f := range append(vsphereConnFlags(), vspherePlanFlags()...) {
		if findFlag(cmd.Flags, f.Names()[0]) == nil {
			cmd.Flags = append(cmd.Flags, f)
		}
	}
	own := cmd.Action
	cmd.ArgsUsage = "SRC|vsphere://[user@]vcenter/DC/vm/NAME"
	cmd.Usage += "; for a vsphere:// URI, plan the whole VM migration"
	cmd.Action = func(c *cli.Context) error {
		for _, a := range c.Args().Slice() {
			if strings.HasPrefix(a, vsphereScheme) {
				return interspersed(vspherePlan)(c)
			}
		}
		if own == nil {
			return fmt.Errorf("plan: want a vsphere:// URI")
		}
		return own(c)
	}
	return cmd
}

// vspherePlanCommand is a stand-alone "plan" for vSphere VMs, for builds
// without another plan command.
func vspherePlanCommand() *cli.Command {
	return withVSpherePlan(&cli.Command{Name: "plan", Usage: "plan a migration (changes nothing)"})
}

func vspherePlan(c *cli.Context) error {
	args := argsOf(c)
	rate, err := parseRate(c.String("rate"))
	if err != nil {
		return err
	}
	o, err := domainOptions(c)
	if err != nil {
		return err
	}
	cl, vm, err := vsphereVM(c, args, 1)
	if err != nil {
		return err
	}
	defer cl.Close(context.WithoutCancel(c.Context))
	src := args[0]
	if !strings.HasPrefix(src, vsphereScheme) {
		src = vsphereScheme + userAt(c) + cl.Host() + vm.Path
	}
	p, err := pipeline.PlanVSphere(c.Context, cl, vm, pipeline.PlanOptions{
		Source: src, Snapshot: c.String("snapshot"), Rate: rate, OutputDir: o.Dir, Format: o.DiskFormat,
		DomainName: o.Name, DomainType: o.Type, NetworkMap: o.NetworkMap, SATA: o.SATA,
	})
	if err != nil {
		return err
	}
	if f := c.String("save"); f != "" {
		if err := savePlan(p, f); err != nil {
			return err
		}
	}
	switch {
	case c.Bool("json"):
		return p.WriteJSON(c.App.Writer)
	case c.Bool("yaml"):
		return p.WriteYAML(c.App.Writer)
	}
	return p.WriteText(c.App.Writer)
}

func userAt(c *cli.Context) string {
	if u := c.String("user"); u != "" {
		return u + "@"
	}
	return ""
}

// savePlan writes the plan under a temporary name and renames it.
func savePlan(p *pipeline.Plan, name string) error {
	tmp, err := os.CreateTemp(filepath.Dir(name), "."+filepath.Base(name)+".*")
	if err != nil {
		return fmt.Errorf("save plan: %w", err)
	}
	defer os.Remove(tmp.Name())
	switch strings.ToLower(filepath.Ext(name)) {
	case ".yaml", ".yml":
		err = p.WriteYAML(tmp)
	case ".json":
		err = p.WriteJSON(tmp)
	default:
		tmp.Close()
		return fmt.Errorf("save plan %s: the name must end in .json, .yaml or .yml", name)
	}
	if err == nil {
		err = tmp.Close()
	} else {
		tmp.Close()
	}
	if err == nil {
		err = os.Rename(tmp.Name(), name)
	}
	if err != nil {
		return fmt.Errorf("save plan %s: %w", name, err)
	}
	return nil
}

// parseRate reads "100MiB", "1.5GiB", "500M" or plain bytes.
func parseRate(s string) (int64, error) {
	t := strings.TrimSuffix(strings.TrimSpace(s), "/s")
	mult := float64(1)
	for _, u := range []struct {
		suffix string
		m      float64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSuffix(t, u.suffix), u.m
			break
		}
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(t), 64)
	if err != nil || v <= 0 || v*mult < 1 || v*mult > 1<<50 {
		return 0, fmt.Errorf("--rate %q: want a positive size per second such as 100MiB", s)
	}
	return int64(v * mult), nil
}
