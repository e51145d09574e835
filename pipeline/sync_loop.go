package pipeline

import (
	"context"
	"fmt"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/cbt"
)

// LoopOptions say how many rounds a sync runs.
type LoopOptions struct {
	// Rounds is a fixed number of rounds (default 1) when UntilDowntime is 0.
	Rounds int
	// Interval is the pause between rounds.
	Interval time.Duration
	// UntilDowntime repeats rounds until the projected final round fits.
	UntilDowntime time.Duration
	// MaxRounds bounds an UntilDowntime loop (default 10).
	MaxRounds int
	// OnRound is called after every round.
	OnRound func(r cbt.Round, p Projection)
}

// Projection estimates the final round (the downtime of a cutover) from the
// last round's measured change rate, copy rate and fixed overhead.
type Projection struct {
	Known            bool    `json:"known"` // false until an incremental round was measured
	ChangeRate       float64 `json:"change_bytes_per_second"`
	CopyRate         float64 `json:"copy_bytes_per_second"`
	OverheadSeconds  float64 `json:"overhead_seconds"`
	ExpectedChanged  int64   `json:"expected_changed_bytes"`
	FinalRoundSecond float64 `json:"final_round_seconds"`
}

// Project estimates the next (final) round from the history. The final round
// copies what changed since the last snapshot: the change rate measured over
// the last incremental round's window, times the time until the final
// snapshot (the last round's duration, or the interval if longer), at the
// copy rate measured so far, plus the last round's snapshot overhead.
func Project(rounds []cbt.Round, gap time.Duration) Projection {
	var p Projection
	if len(rounds) == 0 {
		return p
	}
	last := rounds[len(rounds)-1]
	// Copy rate: the most recent round that read something.
	for i := len(rounds) - 1; i >= 0; i-- {
		if r := rounds[i]; r.Totals.CopySeconds > 0 && r.Totals.Read > 0 {
			p.CopyRate = float64(r.Totals.Read) / r.Totals.CopySeconds
			break
		}
	}
	p.OverheadSeconds = max(0, last.Seconds-last.Totals.CopySeconds)
	if last.Kind == "full" || len(rounds) < 2 {
		return p
	}
	prev := rounds[len(rounds)-2]
	window := last.Start.Sub(prev.Start).Seconds()
	if window <= 0 || p.CopyRate == 0 {
		return p
	}
	p.Known = true
	p.ChangeRate = float64(last.Totals.Changed) / window
	wait := max(last.Seconds, gap.Seconds())
	p.ExpectedChanged = int64(p.ChangeRate * wait)
	p.FinalRoundSecond = p.OverheadSeconds + float64(p.ExpectedChanged)/p.CopyRate
	return p
}

// LoopResult says how a sync loop ended.
type LoopResult struct {
	Rounds     []cbt.Round `json:"rounds"`
	Converged  bool        `json:"converged"`
	Projection Projection  `json:"projection"`
	Reason     string      `json:"reason"`
}

// Run runs rounds as the options say.
func (s *Syncer) Run(ctx context.Context, o LoopOptions) (LoopResult, error) {
	var res LoopResult
	n := o.Rounds
	if n <= 0 {
		n = 1
	}
	if o.UntilDowntime > 0 {
		n = o.MaxRounds
		if n <= 0 {
			n = 10
		}
	}
	for i := 0; i < n; i++ {
		if i > 0 && o.Interval > 0 {
			select {
			case <-ctx.Done():
				return res, ctx.Err()
			case <-time.After(o.Interval):
			}
		}
		r, err := s.Round(ctx, "")
		if err != nil {
			return res, err
		}
		res.Rounds = append(res.Rounds, r)
		res.Projection = Project(s.State.Rounds, o.Interval)
		if o.OnRound != nil {
			o.OnRound(r, res.Projection)
		}
		if o.UntilDowntime > 0 && res.Projection.Known &&
			res.Projection.FinalRoundSecond <= o.UntilDowntime.Seconds() {
			res.Converged = true
			res.Reason = fmt.Sprintf("projected final round %.1fs fits the downtime budget %s after %d round(s): ready for cutover",
				res.Projection.FinalRoundSecond, o.UntilDowntime, len(res.Rounds))
			return res, nil
		}
	}
	switch {
	case o.UntilDowntime > 0 && res.Projection.Known:
		res.Reason = fmt.Sprintf("not converged after %d round(s) (--max-rounds): projected final round %.1fs exceeds the budget %s",
			len(res.Rounds), res.Projection.FinalRoundSecond, o.UntilDowntime)
	case o.UntilDowntime > 0:
		res.Reason = fmt.Sprintf("not converged after %d round(s) (--max-rounds): no incremental round measured yet", len(res.Rounds))
	default:
		res.Reason = fmt.Sprintf("%d round(s) done", len(res.Rounds))
	}
	return res, nil
}
