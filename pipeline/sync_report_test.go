package pipeline

import (
	"encoding/json"
	"github.com/vmdk2kvm/vmdk2kvm/cbt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The report: JSON that reads back, HTML with both charts, one bar pair and
// one point per round, and the downtime.
func TestReportFiles(t *testing.T) {
	st := &cbt.State{Source: "vsphere://vc/DC0/vm/x", Rounds: []cbt.Round{
		{N: 1, Kind: "full", Seconds: 10, Totals: cbt.RoundTotals{Changed: 1 << 30, Read: 1 << 30, CopySeconds: 9}},
		{N: 2, Kind: "incremental", Start: time.Unix(100, 0), Seconds: 1, Totals: cbt.RoundTotals{Changed: 1 << 20, Read: 1 << 20, CopySeconds: 0.5}},
		{N: 3, Kind: "final", Start: time.Unix(200, 0), Seconds: 0.5, Totals: cbt.RoundTotals{Changed: 1 << 10, Read: 1 << 10, CopySeconds: 0.1}},
	}, Cutover: &cbt.CutoverInfo{DowntimeSeconds: 42.5}}
	rep := NewReport(st, 0)
	rep.Steps = []Step{{Name: "fix", Status: "skipped", Detail: "--no-fix"}}
	dir := t.TempDir()
	j, h, err := rep.Write(dir, "r")
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	b, _ := os.ReadFile(j)
	if err := json.Unmarshal(b, &back); err != nil || len(back.Rounds) != 3 || back.Cutover.DowntimeSeconds != 42.5 {
		t.Fatalf("%v %+v", err, back)
	}
	html, _ := os.ReadFile(h)
	s := string(html)
	if strings.Count(s, `<title>changed `) != 3 || strings.Count(s, `class="dot"`) != 3 || !strings.Contains(s, "42.50 s") || !strings.Contains(s, "1 GiB") || !strings.Contains(s, "--no-fix") {
		t.Fatalf("html:\n%s", s)
	}
	if filepath.Dir(h) != dir {
		t.Fatal(h)
	}
	if sum := rep.Summary(); !strings.Contains(sum, "downtime 42.50s") || strings.Count(sum, "round ") < 3 {
		t.Fatal(sum)
	}
}
