package pipeline

import (
	"bytes"
	"encoding/json"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/internal/units"
	"html/template"
	"math"
	"path/filepath"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/cbt"
)

// Report is what `sync --report` and cutover write as JSON (and render as
// HTML): the rounds, the disks, the projection and the cutover.
type Report struct {
	Source     string           `json:"source"`
	Generated  time.Time        `json:"generated"`
	Disks      []cbt.Disk       `json:"disks"`
	Rounds     []cbt.Round      `json:"rounds"`
	Projection Projection       `json:"projection"`
	Converged  *bool            `json:"converged,omitempty"`
	Reason     string           `json:"reason,omitempty"`
	Cutover    *cbt.CutoverInfo `json:"cutover,omitempty"`
	Steps      []Step           `json:"cutover_steps,omitempty"`
}

// Step is one step of a cutover, as reported.
type Step struct {
	Name    string  `json:"name"`
	Status  string  `json:"status"` // done, skipped, failed
	Detail  string  `json:"detail,omitempty"`
	Seconds float64 `json:"seconds"`
}

// NewReport builds a report from a state.
func NewReport(st *cbt.State, interval time.Duration) *Report {
	return &Report{
		Source: st.Source, Generated: time.Now().UTC(), Disks: st.Disks, Rounds: st.Rounds,
		Projection: Project(st.Rounds, interval), Cutover: st.Cutover,
	}
}

// Write writes DIR/NAME.json and DIR/NAME.html atomically and returns their paths.
func (r *Report) Write(dir, name string) (jsonPath, htmlPath string, err error) {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", "", err
	}
	jsonPath = filepath.Join(dir, name+".json")
	if err := cbt.WriteFileAtomic(jsonPath, append(b, '\n'), 0o644); err != nil {
		return "", "", err
	}
	var h bytes.Buffer
	if err := reportTmpl.Execute(&h, r.view()); err != nil {
		return "", "", err
	}
	htmlPath = filepath.Join(dir, name+".html")
	return jsonPath, htmlPath, cbt.WriteFileAtomic(htmlPath, h.Bytes(), 0o644)
}

// Summary is a few lines for a terminal.
func (r *Report) Summary() string {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s: %d round(s)\n", r.Source, len(r.Rounds))
	for _, x := range r.Rounds {
		rate := 0.0
		if x.Totals.CopySeconds > 0 {
			rate = float64(x.Totals.Read) / x.Totals.CopySeconds
		}
		fmt.Fprintf(&b, "  round %d (%s): %s changed, %s read, %s written in %.2fs (%s/s)\n",
			x.N, x.Kind, units.Bytes(x.Totals.Changed), units.Bytes(x.Totals.Read), units.Bytes(x.Totals.Written), x.Seconds, units.Bytes(int64(rate)))
	}
	if r.Projection.Known {
		fmt.Fprintf(&b, "  projected final round: %.2fs (change rate %s/s, copy rate %s/s)\n",
			r.Projection.FinalRoundSecond, units.Bytes(int64(r.Projection.ChangeRate)), units.Bytes(int64(r.Projection.CopyRate)))
	}
	if r.Cutover != nil {
		fmt.Fprintf(&b, "  cutover: downtime %.2fs (power-off to ready)\n", r.Cutover.DowntimeSeconds)
	}
	for _, s := range r.Steps {
		fmt.Fprintf(&b, "    %-14s %-8s %6.2fs  %s\n", s.Name, s.Status, s.Seconds, s.Detail)
	}
	return b.String()
}

type bar struct {
	X, W, Y1, H1, Y2, H2 float64
	Label, Tip1, Tip2    string
}

type point struct {
	X, Y float64
	Tip  string
}

type tick struct {
	Y     float64
	Label string
}

type view struct {
	*Report
	Ticks    []tick // bytes axis
	SecTicks []tick // seconds axis
	Bars     []bar
	Line     string
	Points   []point
	MaxSec   float64
	Rows     []row
	Downtime string
}

type row struct {
	N                             int
	Kind, Changed, Read, Written  string
	Seconds, Rate, Warning, Phase string
}

// view lays out the charts: bytes per round on a log scale (a full round
// dwarfs the incremental ones), duration per round on a linear one.
func (r *Report) view() view {
	v := view{Report: r}
	n := len(r.Rounds)
	if n == 0 {
		return v
	}
	const left, width, height = 60.0, 620.0, 200.0
	slot := width / float64(n)
	logH := func(b int64) float64 {
		if b <= 0 {
			return 0
		}
		return height * math.Log10(float64(b)+1) / 12 // up to ~1 TB
	}
	for _, e := range []struct {
		n     int64
		label string
	}{{1 << 10, "1 KiB"}, {1 << 20, "1 MiB"}, {1 << 30, "1 GiB"}, {1 << 40, "1 TiB"}} {
		v.Ticks = append(v.Ticks, tick{Y: 20 + height - logH(e.n), Label: e.label})
	}
	for i, x := range r.Rounds {
		bw := slot * 0.35
		x0 := left + float64(i)*slot + slot*0.12
		h1, h2 := logH(x.Totals.Changed), logH(x.Totals.Read)
		v.Bars = append(v.Bars, bar{X: x0, W: bw, Y1: 20 + height - h1, H1: h1, Y2: 20 + height - h2, H2: h2,
			Label: fmt.Sprintf("%d %s", x.N, x.Kind),
			Tip1:  "changed " + units.Bytes(x.Totals.Changed), Tip2: "read " + units.Bytes(x.Totals.Read)})
		v.MaxSec = max(v.MaxSec, x.Seconds)
	}
	for _, f := range []float64{0, 0.5, 1} {
		v.SecTicks = append(v.SecTicks, tick{Y: 20 + height - height*f, Label: fmt.Sprintf("%.2f s", f*v.MaxSec)})
	}
	for i, x := range r.Rounds {
		px := left + float64(i)*slot + slot/2
		py := 20 + height - height*x.Seconds/max(v.MaxSec, 1e-9)
		rate := 0.0
		if x.Totals.CopySeconds > 0 {
			rate = float64(x.Totals.Read) / x.Totals.CopySeconds
		}
		v.Points = append(v.Points, point{X: px, Y: py, Tip: fmt.Sprintf("round %d: %.2fs, %s/s", x.N, x.Seconds, units.Bytes(int64(rate)))})
		if i > 0 {
			v.Line += " "
		}
		v.Line += fmt.Sprintf("%.1f,%.1f", px, py)
		ph := ""
		for _, p := range x.Phases {
			ph += fmt.Sprintf("%s %.2fs ", p.Name, p.Seconds)
		}
		warn := ""
		for _, d := range x.Disks {
			if d.Warning != "" {
				warn += d.Warning + " "
			}
		}
		v.Rows = append(v.Rows, row{N: x.N, Kind: x.Kind, Changed: units.Bytes(x.Totals.Changed), Read: units.Bytes(x.Totals.Read),
			Written: units.Bytes(x.Totals.Written), Seconds: fmt.Sprintf("%.2f", x.Seconds), Rate: units.Bytes(int64(rate)) + "/s",
			Warning: warn, Phase: ph})
	}
	if r.Cutover != nil {
		v.Downtime = fmt.Sprintf("%.2f s", r.Cutover.DowntimeSeconds)
	}
	return v
}

var reportTmpl = template.Must(template.New("report").Parse(`<!doctype html>
<html><head><meta charset="utf-8"><title>vmdk2kvm warm migration: {{.Source}}</title>
<style>body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#eee}.changed{fill:#e8a33d}.read{fill:#3d7be8}.line{fill:none;stroke:#c0392b;stroke-width:2}.dot{fill:#c0392b}.big{font-size:1.4em}</style></head>
<body>
<h1>Warm migration of {{.Source}}</h1>
<p>Generated {{.Generated.Format "2006-01-02 15:04:05 MST"}}. {{len .Rounds}} round(s).
{{if .Downtime}}<span class="big">Downtime measured at cutover (power-off to ready): <b>{{.Downtime}}</b></span>{{end}}</p>
{{if .Projection.Known}}<p>Projected final round: {{printf "%.2f" .Projection.FinalRoundSecond}} s
(change rate {{printf "%.0f" .Projection.ChangeRate}} B/s, copy rate {{printf "%.0f" .Projection.CopyRate}} B/s).</p>{{end}}
{{if .Reason}}<p>{{.Reason}}</p>{{end}}
<h2>Bytes per round (log scale)</h2>
<svg width="720" height="260" role="img" aria-label="bytes changed and read per round">
<line x1="60" y1="220" x2="690" y2="220" stroke="#888"/>
{{range .Ticks}}<line x1="55" y1="{{.Y}}" x2="690" y2="{{.Y}}" stroke="#eee"/><text x="2" y="{{.Y}}" font-size="10">{{.Label}}</text>{{end}}
{{range .Bars}}<rect class="changed" x="{{.X}}" y="{{.Y1}}" width="{{.W}}" height="{{.H1}}"><title>{{.Tip1}}</title></rect>
<rect class="read" x="{{.X}}" y="{{.Y2}}" width="{{.W}}" height="{{.H2}}" transform="translate({{.W}},0)"><title>{{.Tip2}}</title></rect>
<text x="{{.X}}" y="240" font-size="11">{{.Label}}</text>{{end}}
<rect class="changed" x="60" y="2" width="10" height="10"/><text x="74" y="11" font-size="11">changed (provider)</text>
<rect class="read" x="200" y="2" width="10" height="10"/><text x="214" y="11" font-size="11">read from the source</text>
</svg>
<h2>Duration per round (max {{printf "%.2f" .MaxSec}} s)</h2>
<svg width="720" height="260" role="img" aria-label="round durations">
<line x1="60" y1="220" x2="690" y2="220" stroke="#888"/>
{{range .SecTicks}}<line x1="55" y1="{{.Y}}" x2="690" y2="{{.Y}}" stroke="#eee"/><text x="2" y="{{.Y}}" font-size="10">{{.Label}}</text>{{end}}
<polyline class="line" points="{{.Line}}"/>
{{range .Points}}<circle class="dot" cx="{{.X}}" cy="{{.Y}}" r="4"><title>{{.Tip}}</title></circle>{{end}}
</svg>
<h2>Rounds</h2>
<table><tr><th>#</th><th>kind</th><th>changed</th><th>read</th><th>written</th><th>seconds</th><th>copy rate</th><th>phases</th><th>warnings</th></tr>
{{range .Rows}}<tr><td>{{.N}}</td><td>{{.Kind}}</td><td>{{.Changed}}</td><td>{{.Read}}</td><td>{{.Written}}</td><td>{{.Seconds}}</td><td>{{.Rate}}</td><td>{{.Phase}}</td><td>{{.Warning}}</td></tr>{{end}}
</table>
<h2>Disks</h2>
<table><tr><th>key</th><th>label</th><th>replica</th><th>format</th><th>capacity</th><th>provider</th><th>token</th></tr>
{{range .Disks}}<tr><td>{{.Key}}</td><td>{{.Label}}</td><td>{{.Replica}}</td><td>{{.Format}}</td><td>{{.Capacity}}</td><td>{{.Provider}}</td><td>{{.Token}}</td></tr>{{end}}
</table>
{{if .Steps}}<h2>Cutover</h2><table><tr><th>step</th><th>status</th><th>seconds</th><th>detail</th></tr>
{{range .Steps}}<tr><td>{{.Name}}</td><td>{{.Status}}</td><td>{{printf "%.2f" .Seconds}}</td><td>{{.Detail}}</td></tr>{{end}}</table>{{end}}
</body></html>
`))
