package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vmdk2kvm/vmdk2kvm/plugins"
)

func pluginsCommand() *cli.Command {
	return &cli.Command{
		Name:  "plugins",
		Usage: "fixer plugins",
		Subcommands: []*cli.Command{{
			Name:  "list",
			Usage: "show the fixer plugins found, their versions and what each applies to",
			Flags: []cli.Flag{
				&cli.StringSliceFlag{Name: "plugin-dir", Usage: "search here first (repeatable)"},
				&cli.BoolFlag{Name: "no-default-plugin-dirs", Usage: "search only --plugin-dir"},
				&cli.DurationFlag{Name: "plugin-timeout", Value: 30 * time.Second, Usage: "per-plugin start/describe timeout"},
				&cli.BoolFlag{Name: "json", Usage: "JSON output"},
			},
			Action: pluginsList,
		}},
	}
}

type pluginRow struct {
	Name       string   `json:"name"`
	Version    string   `json:"version,omitempty"`
	Path       string   `json:"path"`
	SHA256     string   `json:"sha256,omitempty"`
	Summary    string   `json:"summary,omitempty"`
	OSTypes    []string `json:"os_types,omitempty"`
	Distros    []string `json:"distros,omitempty"`
	MinVersion string   `json:"min_version,omitempty"`
	MaxVersion string   `json:"max_version,omitempty"`
	Order      int      `json:"order"`
	After      []string `json:"after,omitempty"`
	Shadowed   []string `json:"shadowed,omitempty"`
	Error      string   `json:"error,omitempty"`
}

func pluginsList(c *cli.Context) error {
	dirs := c.StringSlice("plugin-dir")
	if !c.Bool("no-default-plugin-dirs") {
		dirs = plugins.SearchPath(dirs)
	}
	found, err := plugins.Discover(dirs)
	if err != nil {
		return err
	}
	rows := make([]pluginRow, 0, len(found))
	for _, f := range found {
		r := pluginRow{Name: f.Name, Path: f.Path, Shadowed: f.Shadowed}
		ctx, cancel := context.WithTimeout(c.Context, c.Duration("plugin-timeout"))
		p, err := plugins.Launch(ctx, f, plugins.LaunchOptions{Timeout: c.Duration("plugin-timeout")})
		cancel()
		if err != nil {
			r.Error = err.Error()
			r.SHA256, _ = plugins.FileSHA256(f.Path)
		} else {
			d := p.Desc
			r.Name, r.Version, r.SHA256, r.Summary = d.Name, d.Version, p.SHA256, d.Summary
			r.OSTypes, r.Distros, r.MinVersion, r.MaxVersion, r.Order, r.After = d.OSTypes, d.Distros, d.MinVersion, d.MaxVersion, d.Order, d.After
			p.Kill()
		}
		rows = append(rows, r)
	}
	if c.Bool("json") {
		return json.NewEncoder(c.App.Writer).Encode(map[string]any{"search_path": dirs, "plugins": rows})
	}
	if len(rows) == 0 {
		fmt.Fprintf(c.App.Writer, "no fixer plugins (%s*) in %s\n", plugins.BinaryPrefix, strings.Join(dirs, ":"))
		return nil
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tVERSION\tAPPLIES TO\tORDER\tPATH\tSHA256")
	for _, r := range rows {
		applies := orAny(strings.Join(r.OSTypes, ","))
		if len(r.Distros) > 0 {
			applies += "/" + strings.Join(r.Distros, ",")
		}
		if r.MinVersion != "" || r.MaxVersion != "" {
			applies += fmt.Sprintf(" [%s..%s]", r.MinVersion, r.MaxVersion)
		}
		ver := r.Version
		if r.Error != "" {
			ver = "ERROR"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%.12s\n", r.Name, ver, applies, r.Order, r.Path, r.SHA256)
	}
	tw.Flush()
	for _, r := range rows {
		if r.Error != "" {
			fmt.Fprintf(c.App.Writer, "%s: %s\n", r.Name, r.Error)
		}
	}
	return nil
}

func orAny(s string) string {
	if s == "" {
		return "any"
	}
	return s
}
