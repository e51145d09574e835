package pipeline

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/plugins"
	pb "github.com/vmdk2kvm/vmdk2kvm/plugins/proto"
)

// Plugin outcomes in a FixReport.
const (
	StatusApplied = "applied" // planned actions were all done
	StatusPlanned = "planned" // dry run: actions listed, nothing done
	StatusNothing = "nothing" // nothing to do (already fixed)
	StatusSkipped = "skipped" // does not apply to this guest
	StatusFailed  = "failed"  // crashed, hung, refused, or an action failed
)

// FixReport is what INSPECT → PLAN → FIX did: the guest, and per plugin its
// plan, what it did, and every mutation the host recorded.
type FixReport struct {
	Image      string            `json:"image"`
	DryRun     bool              `json:"dry_run"`
	OnError    string            `json:"on_fixer_error"`
	Started    time.Time         `json:"started"`
	Finished   time.Time         `json:"finished"`
	Inspection *InspectionReport `json:"inspection,omitempty"`
	Plugins    []PluginReport    `json:"plugins"`
	Error      string            `json:"error,omitempty"`
}

// InspectionReport is the guest as libguestfs saw it.
type InspectionReport struct {
	OSType      string             `json:"os_type"`
	Distro      string             `json:"distro,omitempty"`
	Version     string             `json:"version,omitempty"`
	Product     string             `json:"product,omitempty"`
	Hostname    string             `json:"hostname,omitempty"`
	Arch        string             `json:"arch,omitempty"`
	Root        string             `json:"root,omitempty"`
	Firmware    string             `json:"firmware,omitempty"`
	Filesystems []FilesystemReport `json:"filesystems,omitempty"`
}

// FilesystemReport is one filesystem of the guest.
type FilesystemReport struct {
	Device     string `json:"device"`
	Type       string `json:"type"`
	UUID       string `json:"uuid,omitempty"`
	Label      string `json:"label,omitempty"`
	Mountpoint string `json:"mountpoint,omitempty"`
}

// PluginReport is one plugin's part of the run.
type PluginReport struct {
	Name       string             `json:"name"`
	Version    string             `json:"version,omitempty"`
	Path       string             `json:"path"`
	SHA256     string             `json:"sha256,omitempty"`
	Summary    string             `json:"summary,omitempty"`
	Status     string             `json:"status"`
	SkipReason string             `json:"skip_reason,omitempty"`
	Planned    []ActionReport     `json:"planned,omitempty"`
	Done       []ActionReport     `json:"done,omitempty"`
	Warnings   []string           `json:"warnings,omitempty"`
	Errors     []string           `json:"errors,omitempty"`
	Error      string             `json:"error,omitempty"`
	Mutations  []plugins.Mutation `json:"mutations,omitempty"`
}

// ActionReport is one planned or done action.
type ActionReport struct {
	ID      string   `json:"id"`
	Summary string   `json:"summary"`
	Kind    string   `json:"kind"`
	Path    string   `json:"path,omitempty"`
	Command []string `json:"command,omitempty"`
	Diff    string   `json:"diff,omitempty"`
}

func actionReports(as []*pb.Action) []ActionReport {
	out := make([]ActionReport, 0, len(as))
	for _, a := range as {
		out = append(out, ActionReport{ID: a.Id, Summary: a.Summary, Kind: a.Kind, Path: a.Path, Command: a.Command, Diff: a.Diff})
	}
	return out
}

func inspectionReport(in *pb.Inspection) *InspectionReport {
	r := &InspectionReport{OSType: in.OsType, Distro: in.Distro, Product: in.ProductName, Hostname: in.Hostname,
		Arch: in.Arch, Root: in.Root, Firmware: in.Firmware}
	if in.Major != 0 || in.Minor != 0 {
		r.Version = fmt.Sprintf("%d.%d", in.Major, in.Minor)
	}
	for _, f := range in.Filesystems {
		r.Filesystems = append(r.Filesystems, FilesystemReport{Device: f.Device, Type: f.Type, UUID: f.Uuid, Label: f.Label, Mountpoint: f.Mountpoint})
	}
	return r
}

// Actions counts planned actions over all plugins.
func (r *FixReport) Actions() int {
	n := 0
	for _, p := range r.Plugins {
		n += len(p.Planned)
	}
	return n
}

// JSON renders the report as indented JSON.
func (r *FixReport) JSON() ([]byte, error) { return json.MarshalIndent(r, "", "  ") }

// Markdown renders the report for people: the guest, then per plugin its
// actions with their diffs, warnings and errors, and the recorded mutations.
func (r *FixReport) Markdown() string {
	var b strings.Builder
	title := "Fix report"
	if r.DryRun {
		title = "Fix plan"
	}
	fmt.Fprintf(&b, "# %s: %s\n\n", title, r.Image)
	if r.Error != "" {
		fmt.Fprintf(&b, "**FAILED:** %s\n\n", r.Error)
	}
	if in := r.Inspection; in != nil {
		fmt.Fprintf(&b, "Guest: %s %s %s (%s), %s, root `%s`, firmware %s\n\n", in.OSType, in.Distro, in.Version, in.Product, in.Arch, in.Root, in.Firmware)
		if len(in.Filesystems) > 0 {
			b.WriteString("| device | type | UUID | label | mounted on |\n|---|---|---|---|---|\n")
			for _, f := range in.Filesystems {
				fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", f.Device, f.Type, f.UUID, f.Label, f.Mountpoint)
			}
			b.WriteString("\n")
		}
	}
	for _, p := range r.Plugins {
		fmt.Fprintf(&b, "## %s %s: %s\n\n", p.Name, p.Version, p.Status)
		if p.SHA256 != "" {
			fmt.Fprintf(&b, "`%s` sha256 `%s`\n\n", p.Path, p.SHA256)
		}
		if p.SkipReason != "" {
			fmt.Fprintf(&b, "Skipped: %s\n\n", p.SkipReason)
		}
		if p.Error != "" {
			fmt.Fprintf(&b, "**Error:** %s\n\n", p.Error)
		}
		if len(p.Planned) == 0 && p.Status == StatusNothing {
			b.WriteString("Nothing to do.\n\n")
		}
		done := map[string]bool{}
		for _, a := range p.Done {
			done[a.ID] = true
		}
		for i, a := range p.Planned {
			mark := ""
			switch {
			case r.DryRun:
			case done[a.ID]:
				mark = " (done)"
			default:
				mark = " (NOT done)"
			}
			fmt.Fprintf(&b, "%d. %s%s\n", i+1, a.Summary, mark)
			if len(a.Command) > 0 {
				fmt.Fprintf(&b, "\n   `%s`\n", strings.Join(a.Command, " "))
			}
			if a.Diff != "" {
				b.WriteString("\n```diff\n" + a.Diff)
				if !strings.HasSuffix(a.Diff, "\n") {
					b.WriteString("\n")
				}
				b.WriteString("```\n")
			}
			b.WriteString("\n")
		}
		for _, w := range p.Warnings {
			fmt.Fprintf(&b, "- warning: %s\n", w)
		}
		for _, e := range p.Errors {
			fmt.Fprintf(&b, "- error: %s\n", e)
		}
		if len(p.Mutations) > 0 {
			b.WriteString("\nRecorded guest mutations:\n\n")
			for _, m := range p.Mutations {
				what := m.Path
				if len(m.Argv) > 0 {
					what = strings.Join(m.Argv, " ")
				}
				if m.Target != "" {
					what += " -> " + m.Target
				}
				status := "ok"
				if m.Error != "" {
					status = "error: " + m.Error
				}
				fmt.Fprintf(&b, "- %s `%s` (%s)\n", m.Op, what, status)
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

// WriteFiles writes PREFIX.md and PREFIX.json (each through a temp name).
func (r *FixReport) WriteFiles(prefix string) error {
	j, err := r.JSON()
	if err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		data []byte
	}{{prefix + ".json", append(j, '\n')}, {prefix + ".md", []byte(r.Markdown())}} {
		tmp := f.name + ".tmp"
		if err := os.WriteFile(tmp, f.data, 0o644); err != nil {
			return fmt.Errorf("write report: %w", err)
		}
		if err := os.Rename(tmp, f.name); err != nil {
			return fmt.Errorf("write report: %w", err)
		}
	}
	return nil
}
