package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/cbt"
	"github.com/vmdk2kvm/vmdk2kvm/copier"
	"github.com/vmdk2kvm/vmdk2kvm/filters"
	"github.com/vmdk2kvm/vmdk2kvm/pipeline"
	"github.com/vmdk2kvm/vmdk2kvm/progress"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	httpsrc "github.com/vmdk2kvm/vmdk2kvm/sources/http"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
	"github.com/vmdk2kvm/vmdk2kvm/sources/vmdk"
	"github.com/vmdk2kvm/vmdk2kvm/vmware"
)

// warmFlags are shared by sync and cutover.
func warmFlags() []cli.Flag {
	return append(remoteFlags(),
		&cli.StringFlag{Name: "target", Aliases: []string{"t"}, Required: true, Usage: "folder of the replicas and the sync state"},
		&cli.StringFlag{Name: "output-format", Aliases: []string{"O"}, Usage: "replica format: qcow2 or raw (default: the target's, qcow2 for a new one)"},
		&cli.BoolFlag{Name: "yes", Aliases: []string{"y"}, Usage: "remove a leftover migration snapshot of a killed run without asking"},
		&cli.BoolFlag{Name: "quiesce", Usage: "quiesce the guest file systems (VMware Tools) for each round's snapshot"},
		&cli.StringFlag{Name: "provider", Value: "cbt", Usage: "what tells the changes: cbt (vSphere changed block tracking) or hash (no CBT: read the whole disk, write only blocks whose hash differs)"},
		&cli.IntFlag{Name: "workers", Usage: "parallel readers (0: automatic)"},
		&cli.BoolFlag{Name: "json", Usage: "progress and summary as JSON lines on stdout"},
	)
}

func syncCommand() *cli.Command {
	return &cli.Command{
		Name:      "sync",
		Usage:     "warm migration: copy a running VM into pristine replicas, then keep them current with CBT incremental rounds",
		ArgsUsage: "vsphere://[user@]vcenter/DC/vm/[FOLDER/]NAME",
		Flags: append(warmFlags(),
			&cli.BoolFlag{Name: "enable-cbt", Usage: "turn changed block tracking on when it is off (takes effect at the round's snapshot)"},
			&cli.IntFlag{Name: "rounds", Value: 1, Usage: "rounds to run"},
			&cli.DurationFlag{Name: "interval", Usage: "pause between rounds"},
			&cli.DurationFlag{Name: "until-downtime", Usage: "repeat rounds until the projected final round fits this downtime budget"},
			&cli.IntFlag{Name: "max-rounds", Value: 10, Usage: "bound of an --until-downtime loop"},
			&cli.BoolFlag{Name: "report", Usage: "write sync-report.json and sync-report.html into the target folder"},
		),
		Action: func(c *cli.Context) error {
			w, err := openWarm(c, c.Bool("enable-cbt"))
			if err != nil {
				return err
			}
			defer w.close()
			rep := newProgress(c)
			w.syncer.SetProgress(func(disk string, p copier.Progress) { rep.Update(p.Done, p.Total) })
			res, err := w.syncer.Run(c.Context, pipeline.LoopOptions{
				Rounds: c.Int("rounds"), Interval: c.Duration("interval"),
				UntilDowntime: c.Duration("until-downtime"), MaxRounds: c.Int("max-rounds"),
				OnRound: func(r cbt.Round, p pipeline.Projection) {
					rep.Done()
					printRound(c, r, p)
				},
			})
			rep.Done()
			if err != nil {
				return fmt.Errorf("sync %s: %w", w.src.Describe(), err)
			}
			report := pipeline.NewReport(w.syncer.State, c.Duration("interval"))
			conv := res.Converged
			if c.Duration("until-downtime") > 0 {
				report.Converged = &conv
			}
			report.Reason = res.Reason
			if c.Bool("json") {
				json.NewEncoder(c.App.Writer).Encode(map[string]any{"event": "sync-done", "result": res, "state": w.syncer.StatePath()})
			} else {
				fmt.Fprintf(c.App.ErrWriter, "sync: %s\n", res.Reason)
			}
			if c.Bool("report") {
				j, h, err := report.Write(c.String("target"), "sync-report")
				if err != nil {
					return err
				}
				fmt.Fprintf(c.App.ErrWriter, "sync: report in %s and %s\n", j, h)
			}
			return nil
		},
	}
}

func newProgress(c *cli.Context) progress.Reporter {
	mode := progress.Auto
	if c.Bool("json") {
		mode = progress.JSON
	}
	return progress.New(mode, "sync", c.App.ErrWriter)
}

func printRound(c *cli.Context, r cbt.Round, p pipeline.Projection) {
	if c.Bool("json") {
		json.NewEncoder(c.App.Writer).Encode(map[string]any{"event": "round", "round": r, "projection": p})
		return
	}
	for _, d := range r.Disks {
		if d.Warning != "" {
			fmt.Fprintf(c.App.ErrWriter, "sync: warning: disk %s: %s\n", d.Key, d.Warning)
		}
	}
	fmt.Fprintf(c.App.ErrWriter, "sync: round %d (%s): %s changed, %s read, %s written in %.2fs\n",
		r.N, r.Kind, human(r.Totals.Changed), human(r.Totals.Read), human(r.Totals.Written), r.Seconds)
	if p.Known {
		fmt.Fprintf(c.App.ErrWriter, "sync: projected final round %.2fs (changes %s/s, copy %s/s)\n",
			p.FinalRoundSecond, human(int64(p.ChangeRate)), human(int64(p.CopyRate)))
	}
}

// warm is an open vSphere connection and a syncer on the target folder.
type warm struct {
	client *vmware.Client
	vm     *vmware.VM
	src    *pipeline.VSphereSource
	syncer *pipeline.Syncer
}

func (w *warm) close() {
	if w.syncer != nil {
		w.syncer.Close()
	}
	w.client.Close(context.Background())
}

// openWarm connects, finds the VM, deals with a leftover migration snapshot
// and opens the target's state.
func openWarm(c *cli.Context, enableCBT bool) (*warm, error) {
	if c.NArg() != 1 {
		return nil, fmt.Errorf("%s: want one vsphere:// URI, got %d arguments", c.Command.Name, c.NArg())
	}
	if p := c.String("provider"); p != "cbt" && p != "hash" {
		return nil, fmt.Errorf("--provider %q: want cbt or hash", p)
	}
	uri, err := vmware.ParseURI(c.Args().First())
	if err != nil {
		return nil, err
	}
	user := uri.User
	if user == "" {
		user = c.String("user")
	}
	// Ask once; the control plane and the data path share it.
	pw, err := passwordSource(c)()
	if err != nil {
		return nil, err
	}
	client, err := vmware.Connect(c.Context, vmware.Config{
		URL: uri.Server, User: user, Password: pw,
		Thumbprint: c.String("thumbprint"), Insecure: c.Bool("insecure"),
	})
	if err != nil {
		return nil, err
	}
	vm, err := client.FindVM(c.Context, uri.Path)
	if err != nil {
		client.Close(context.Background())
		return nil, err
	}
	hc := httpConfig(c)
	hc.User, hc.Password = user, func() (string, error) { return pw, nil }
	// Incremental rounds read many small scattered ranges: a small cache
	// block and no readahead keep the bytes read close to the bytes changed.
	hc.Cache = filters.CacheOptions{BlockSize: 64 << 10, Readahead: -1}
	reg := sources.NewRegistry()
	reg.AddTransport(httpsrc.New(hc))
	reg.AddFormat(vmdk.Format{}).AddFormat(raw.Format{})
	src := &pipeline.VSphereSource{
		Client: client.Vim(), VM: vm.Ref, Name: vm.Path, DCPath: vm.DCPath, EnableCBT: enableCBT,
		Hashes: c.String("provider") == "hash", Quiesce: c.Bool("quiesce"),
		Resolve: func(ctx context.Context, snapshot string) (map[int32]string, error) {
			paths, err := client.ResolveDisks(ctx, vm, snapshot)
			if err != nil {
				return nil, err
			}
			out := map[int32]string{}
			for _, p := range paths {
				if p.Method != "https" || p.URL == "" {
					return nil, fmt.Errorf("disk %s (%s) cannot be read over HTTPS /folder (%s): %s", p.Label, p.Address, p.Method, strings.Join(p.Warnings, "; "))
				}
				out[p.Key] = p.URL
			}
			return out, nil
		},
		EnableCBTFunc: func(ctx context.Context) error {
			res, err := client.EnableCBT(ctx, vm, false)
			if err == nil {
				fmt.Fprintf(c.App.ErrWriter, "sync: changed block tracking enabled on %s (disks %s); it takes effect at this round's snapshot\n", vm.Path, strings.Join(res.Disks, ", "))
			}
			return err
		},
		OpenURL: func(ctx context.Context, loc string) (block.Device, error) {
			img, err := reg.Open(ctx, loc, sources.Options{Format: "vmdk"})
			if err != nil {
				return nil, err
			}
			return img, nil
		},
	}
	w := &warm{client: client, vm: vm, src: src}
	if err := cleanLeftovers(c, src); err != nil {
		w.close()
		return nil, err
	}
	w.syncer, err = pipeline.OpenSync(pipeline.SyncConfig{
		Source: src, Target: c.String("target"), Format: c.String("output-format"),
		Sinks: newSinks(), Workers: c.Int("workers"), Hook: testHook(c),
	})
	if err != nil {
		w.close()
		return nil, err
	}
	return w, nil
}

// testHookEnv, when set to a duration, makes sync name each step of a round
// on stderr ("sync-hook: POINT") and pause that long there, so the crash
// tests can SIGKILL it at a chosen step (during the copy, between the flush
// and the state commit, during the snapshot removal).
const testHookEnv = "VMDK2KVM_TEST_HOOK_PAUSE"

func testHook(c *cli.Context) func(string) {
	v := os.Getenv(testHookEnv)
	if v == "" {
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return nil
	}
	return func(point string) {
		fmt.Fprintf(c.App.ErrWriter, "sync-hook: %s\n", point)
		time.Sleep(d)
	}
}

// cleanLeftovers removes a migration snapshot left by a killed run: with
// --yes, or after asking on a terminal.
func cleanLeftovers(c *cli.Context, src *pipeline.VSphereSource) error {
	left, err := src.Leftovers(c.Context)
	if err != nil || len(left) == 0 {
		return err
	}
	what := strings.Join(left, ", ")
	if !c.Bool("yes") {
		tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
		if err != nil || !term.IsTerminal(int(tty.Fd())) {
			if tty != nil {
				tty.Close()
			}
			return fmt.Errorf("%s has a leftover migration snapshot from an interrupted run (%s): rerun with --yes to remove it", src.Name, what)
		}
		defer tty.Close()
		fmt.Fprintf(tty, "%s has a leftover migration snapshot from an interrupted run (%s). Remove it? [y/N] ", src.Name, what)
		line, _ := bufio.NewReader(tty).ReadString('\n')
		if a := strings.ToLower(strings.TrimSpace(line)); a != "y" && a != "yes" {
			return fmt.Errorf("leftover migration snapshot kept (%s): nothing done", what)
		}
	}
	fmt.Fprintf(c.App.ErrWriter, "sync: removing leftover migration snapshot %s\n", what)
	return src.RemoveLeftovers(c.Context)
}
