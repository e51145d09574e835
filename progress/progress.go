// Package progress shows long work to a person or a script: a bar with bytes,
// rate and ETA when stderr is a terminal, JSON lines when asked, and nothing
// in a pipe.
package progress

import (
	"encoding/json"
	"io"
	"os"
	"sync"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"
)

// Mode selects how progress is shown.
type Mode int

const (
	// Auto: a bar on a terminal, nothing otherwise.
	Auto Mode = iota
	// JSON: one JSON object a line on the given writer.
	JSON
	// Quiet: nothing.
	Quiet
)

// Reporter receives (done, total) updates for one task.
type Reporter interface {
	Update(done, total int64)
	Done()
}

// New returns a reporter for a task named label.
func New(mode Mode, label string, out io.Writer) Reporter {
	switch mode {
	case JSON:
		return &jsonReporter{enc: json.NewEncoder(out), label: label, start: time.Now()}
	case Auto:
		if IsTerminal(os.Stderr) {
			return newBar(label)
		}
	}
	return nop{}
}

// IsTerminal reports whether f is a terminal.
func IsTerminal(f *os.File) bool { return term.IsTerminal(int(f.Fd())) }

type nop struct{}

func (nop) Update(int64, int64) {}
func (nop) Done()               {}

type jsonReporter struct {
	mu    sync.Mutex
	enc   *json.Encoder
	label string
	start time.Time
	last  time.Time
}

func (j *jsonReporter) Update(done, total int64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	now := time.Now()
	if now.Sub(j.last) < time.Second && done < total {
		return
	}
	j.last = now
	secs := now.Sub(j.start).Seconds()
	rate := 0.0
	if secs > 0 {
		rate = float64(done) / secs
	}
	j.enc.Encode(map[string]any{"event": "progress", "task": j.label, "done": done, "total": total, "bytes_per_second": int64(rate)})
}

func (j *jsonReporter) Done() {}

type bar struct {
	p *mpb.Progress
	b *mpb.Bar
}

func newBar(label string) *bar {
	p := mpb.New(mpb.WithOutput(os.Stderr), mpb.WithRefreshRate(150*time.Millisecond))
	b := p.AddBar(0,
		mpb.PrependDecorators(decor.Name(label+" "), decor.CountersKibiByte("% .1f / % .1f")),
		mpb.AppendDecorators(decor.AverageSpeed(decor.SizeB1024(0), " % .1f"), decor.Name(" ETA "), decor.AverageETA(decor.ET_STYLE_GO)),
	)
	return &bar{p: p, b: b}
}

func (b *bar) Update(done, total int64) {
	b.b.SetTotal(total, false)
	b.b.SetCurrent(done)
}

func (b *bar) Done() {
	b.b.SetTotal(-1, true)
	b.p.Wait()
}
