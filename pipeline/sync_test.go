package pipeline

import (
	"context"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/object"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/cbt"
	"github.com/vmdk2kvm/vmdk2kvm/cbt/cbttest"
	"github.com/vmdk2kvm/vmdk2kvm/filters"
	"github.com/vmdk2kvm/vmdk2kvm/internal/testutil"
	"github.com/vmdk2kvm/vmdk2kvm/qcow2"
	"github.com/vmdk2kvm/vmdk2kvm/sinks"
	rawsink "github.com/vmdk2kvm/vmdk2kvm/sinks/raw"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	httpsrc "github.com/vmdk2kvm/vmdk2kvm/sources/http"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
	"github.com/vmdk2kvm/vmdk2kvm/sources/vmdk"
	"github.com/vmdk2kvm/vmdk2kvm/vmware/vmwaretest"
)

// vsphereSource connects to the harness through its counting proxy, as the
// CLI does: SOAP for the control plane, /folder ranges for the data.
func vsphereSource(t *testing.T, h *cbttest.Harness) *VSphereSource {
	t.Helper()
	ctx := context.Background()
	u := *h.Proxy.URL
	u.User = url.UserPassword(vmwaretest.User, vmwaretest.Password)
	c, err := govmomi.NewClient(ctx, &u, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Logout(context.Background()) })
	reg := sources.NewRegistry()
	reg.AddTransport(httpsrc.New(httpsrc.Config{
		Insecure: true, User: vmwaretest.User,
		Password: func() (string, error) { return vmwaretest.Password, nil },
		Cache:    filters.CacheOptions{BlockSize: 64 << 10, Readahead: -1},
	}))
	reg.AddFormat(vmdk.Format{}).AddFormat(raw.Format{})
	return &VSphereSource{
		Client: c.Client, VM: h.VM, Name: "/" + vmwaretest.Datacenter + "/vm/" + h.Name, DCPath: vmwaretest.Datacenter,
		OpenURL: func(ctx context.Context, loc string) (block.Device, error) {
			img, err := reg.Open(ctx, loc, sources.Options{Format: "vmdk"})
			if err != nil {
				return nil, err
			}
			return img, nil
		},
	}
}

func newSinks() *sinks.Registry { return sinks.NewRegistry(rawsink.Format{}, qcow2.SinkFormat{}) }

func allocated(t *testing.T, path string, size int64) int64 {
	t.Helper()
	var n int64
	for _, e := range testutil.QemuMap(t, "raw", path) {
		if e.Data {
			n += e.Length
		}
	}
	return n
}

// Rounds against the simulator: after every round the replica equals the
// disk, and the datastore served the changed bytes, not the disk.
func TestSyncRoundsAgainstSimulator(t *testing.T) {
	ctx := context.Background()
	h := cbttest.New(t, cbttest.Options{Size: 48 << 20, Seed: 3, PageAreas: 3, PageBytes: 4 << 20, PoweredOn: true})
	src := vsphereSource(t, h)
	target := t.TempDir()
	s, err := OpenSync(SyncConfig{Source: src, Target: target, Sinks: newSinks(), Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := OpenSync(SyncConfig{Source: src, Target: target, Sinks: newSinks()}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("a second sync on the same target: %v", err)
	}
	// CBT is off and not to be enabled: a clear error, and no snapshot left.
	if _, err := s.Round(ctx, ""); err == nil || !strings.Contains(err.Error(), "--enable-cbt") {
		t.Fatalf("round without CBT: %v", err)
	}
	src.EnableCBT = true

	replica := func() string { return filepath.Join(target, s.State.Disks[0].Replica) }
	check := func(round int, maxRead int64) cbt.Round {
		t.Helper()
		h.Proxy.Reset()
		r, err := s.Round(ctx, "")
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		testutil.Compare(t, "qcow2", replica(), "raw", h.Flat)
		testutil.Run(t, "qemu-img", "check", "-f", "qcow2", replica())
		got := h.Proxy.FolderBytes()
		if got < r.Totals.Read || got > maxRead {
			t.Fatalf("round %d read %d bytes from the datastore, want at most %d (changed %d)", round, got, maxRead, r.Totals.Changed)
		}
		if snaps, _ := h.Snapshots(ctx); len(snaps) != 0 {
			t.Fatalf("round %d left snapshots %v", round, snaps)
		}
		t.Logf("round %d (%s): changed %d, read %d (datastore served %d)", round, r.Kind, r.Totals.Changed, r.Totals.Read, got)
		return r
	}
	const meta = 128 << 10 // descriptor reads and the first ranged probe
	alloc := allocated(t, h.Flat, h.Size())
	r := check(1, alloc+meta)
	if r.Kind != "full" || r.Totals.Changed != alloc {
		t.Fatalf("round 1: kind %s changed %d, want full of %d allocated bytes", r.Kind, r.Totals.Changed, alloc)
	}
	tok1 := s.State.Disks[0].Token

	// The guest writes scattered runs and trims a range.
	wrote, err := h.WriteRandomRuns(7, 12, 64<<10, 512<<10)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Discard(40<<20, 3<<20); err != nil {
		t.Fatal(err)
	}
	r = check(2, wrote+3<<20+meta)
	if r.Kind != "incremental" || r.Totals.Changed > wrote+3<<20 || r.Totals.Changed == 0 {
		t.Fatalf("round 2: kind %s changed %d (wrote %d + 3 MiB trimmed)", r.Kind, r.Totals.Changed, wrote)
	}
	tok2 := s.State.Disks[0].Token
	if tok2 == tok1 {
		t.Fatal("change ID not advanced")
	}

	// Nothing changed: nothing read, but the new change ID is stored.
	r = check(3, meta)
	if r.Totals.Changed != 0 || s.State.Disks[0].Token == tok2 {
		t.Fatalf("round 3: changed %d, token %q (was %q)", r.Totals.Changed, s.State.Disks[0].Token, tok2)
	}

	// CBT reset: full resync with a warning.
	h.ResetCBT()
	if _, err := h.WriteRandomRuns(8, 3, 64<<10, 128<<10); err != nil {
		t.Fatal(err)
	}
	r = check(4, allocated(t, h.Flat, h.Size())+meta)
	if !r.Disks[0].Full || r.Disks[0].Warning == "" {
		t.Fatalf("round 4 after reset: %+v", r.Disks[0])
	}

	// The disk grows and the guest writes into the new space.
	if err := h.Grow(ctx, 64<<20); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 256<<10)
	for i := range p {
		p[i] = byte(i * 7)
	}
	if err := h.Write(60<<20, p); err != nil {
		t.Fatal(err)
	}
	r = check(5, int64(len(p))+meta)
	if !r.Disks[0].Resized {
		t.Fatal("round 5: replica not resized")
	}
	if len(s.State.Rounds) != 5 {
		t.Fatalf("%d rounds in the state", len(s.State.Rounds))
	}
	// The state on disk is what the syncer holds.
	st, err := cbt.LoadState(filepath.Join(target, cbt.StateFile))
	if err != nil || st.Disks[0].Token != s.State.Disks[0].Token || st.LastRound() != 5 {
		t.Fatalf("saved state: %v %+v", err, st)
	}
}

// Without CBT, the block-hash provider: the frozen disk is hashed in full,
// only blocks that differ from the manifest are written.
func TestSyncBlockHashes(t *testing.T) {
	ctx := context.Background()
	h := cbttest.New(t, cbttest.Options{Size: 16 << 20, Seed: 2, PoweredOn: true})
	src := vsphereSource(t, h)
	src.Hashes = true
	target := t.TempDir()
	s, err := OpenSync(SyncConfig{Source: src, Target: target, Sinks: newSinks(), Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	round := func() cbt.Round {
		t.Helper()
		r, err := s.Round(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		testutil.Compare(t, "qcow2", filepath.Join(target, s.State.Disks[0].Replica), "raw", h.Flat)
		return r
	}
	if r := round(); !r.Disks[0].Full || r.Disks[0].Provider != "block-hash" {
		t.Fatalf("round 1: %+v", r.Disks[0])
	}
	if err := h.Write(3<<20+100, []byte("changed")); err != nil {
		t.Fatal(err)
	}
	if err := h.Discard(10<<20, 256<<10); err != nil {
		t.Fatal(err)
	}
	r := round()
	if r.Disks[0].Full || r.Totals.Changed > 3*256<<10 || r.Totals.Changed == 0 {
		t.Fatalf("round 2: full=%v changed %d", r.Disks[0].Full, r.Totals.Changed)
	}
	// A crash after the manifest was invalidated: rebuilt from the replica.
	if err := os.Remove(filepath.Join(target, s.State.Disks[0].Replica+".hashes")); err != nil {
		t.Fatal(err)
	}
	if err := h.Write(5<<20, []byte("again")); err != nil {
		t.Fatal(err)
	}
	if r := round(); r.Disks[0].Full || r.Disks[0].Warning == "" || r.Totals.Changed != 256<<10 {
		t.Fatalf("round 3: %+v", r.Disks[0])
	}
}

// --until-downtime: rounds repeat until the projection fits the budget, or
// --max-rounds says stop.
func TestSyncUntilDowntime(t *testing.T) {
	ctx := context.Background()
	h := cbttest.New(t, cbttest.Options{Size: 8 << 20, CBT: true, PoweredOn: true})
	src := vsphereSource(t, h)
	s, err := OpenSync(SyncConfig{Source: src, Target: t.TempDir(), Sinks: newSinks()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var seen int
	res, err := s.Run(ctx, LoopOptions{UntilDowntime: time.Minute, MaxRounds: 5, OnRound: func(cbt.Round, Projection) { seen++ }})
	if err != nil {
		t.Fatal(err)
	}
	// Round 1 is full (no rate yet); round 2 measures and fits.
	if !res.Converged || len(res.Rounds) != 2 || seen != 2 || !strings.Contains(res.Reason, "fits") {
		t.Fatalf("%+v", res)
	}
	res, err = s.Run(ctx, LoopOptions{UntilDowntime: time.Nanosecond, MaxRounds: 2})
	if err != nil {
		t.Fatal(err)
	}
	if res.Converged || len(res.Rounds) != 2 || !strings.Contains(res.Reason, "not converged") {
		t.Fatalf("%+v", res)
	}
	if got := s.State.LastRound(); got != 4 {
		t.Fatalf("%d rounds recorded", got)
	}
}

// A cutover whose fix stage fails: the error says so, the replica is
// untouched (the final round's content, no fix), and sync still runs.
func TestCutoverFixFailureKeepsReplica(t *testing.T) {
	ctx := context.Background()
	h := cbttest.New(t, cbttest.Options{Size: 8 << 20, CBT: true, PoweredOn: true})
	src := vsphereSource(t, h)
	target := t.TempDir()
	s, err := OpenSync(SyncConfig{Source: src, Target: target, Sinks: newSinks()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Round(ctx, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := h.WriteRandomRuns(3, 2, 64<<10, 128<<10); err != nil {
		t.Fatal(err)
	}
	var fixed string
	rep, err := Cutover(ctx, CutoverConfig{Syncer: s, Source: src, ShutdownTimeout: 10 * time.Second,
		Fix: func(_ context.Context, overlay string) (string, error) {
			fixed = overlay
			// What a fixer does before failing: it writes into the overlay.
			testutil.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xee 0 64k", overlay)
			return "", errors.New("inspection found no operating system")
		}})
	if err == nil || !strings.Contains(err.Error(), "replicas are untouched") {
		t.Fatalf("cutover: %v", err)
	}
	last := rep.Steps[len(rep.Steps)-1]
	if last.Name != "fix" || last.Status != "failed" {
		t.Fatalf("steps %+v", rep.Steps)
	}
	replica := filepath.Join(target, s.State.Disks[0].Replica)
	if filepath.Dir(fixed) != target || fixed == replica {
		t.Fatalf("fix ran on %s", fixed)
	}
	// The final round ran; the fixer's write stayed in the overlay.
	testutil.Compare(t, "qcow2", replica, "raw", h.Flat)
	// Power the VM on again: sync continues from the final round.
	task, err := object.NewVirtualMachine(src.Client, h.VM).PowerOn(ctx)
	if err == nil {
		err = task.Wait(ctx)
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.WriteRandomRuns(4, 2, 64<<10, 128<<10); err != nil {
		t.Fatal(err)
	}
	r, err := s.Round(ctx, "")
	if err != nil || r.Kind != "incremental" {
		t.Fatalf("sync after a failed cutover: %v %+v", err, r)
	}
	testutil.Compare(t, "qcow2", replica, "raw", h.Flat)
}

// A leftover migration snapshot (a killed run) is found by name and removed.
func TestLeftoverSnapshot(t *testing.T) {
	ctx := context.Background()
	h := cbttest.New(t, cbttest.Options{Size: 8 << 20, CBT: true})
	src := vsphereSource(t, h)
	vm := object.NewVirtualMachine(src.Client, h.VM)
	task, err := vm.CreateSnapshot(ctx, MigrationSnapshot, "", false, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	left, err := src.Leftovers(ctx)
	if err != nil || len(left) != 1 {
		t.Fatalf("leftovers %v %v", left, err)
	}
	if err := src.RemoveLeftovers(ctx); err != nil {
		t.Fatal(err)
	}
	if left, _ := src.Leftovers(ctx); len(left) != 0 {
		t.Fatalf("still there: %v", left)
	}
}

// The projection: no estimate before an incremental round; then overhead
// plus the changes expected until the final snapshot at the copy rate.
func TestProject(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	rounds := []cbt.Round{
		{N: 1, Kind: "full", Start: t0, Seconds: 100, Totals: cbt.RoundTotals{Changed: 1000 << 20, Read: 1000 << 20, CopySeconds: 90}},
	}
	if p := Project(rounds, 0); p.Known {
		t.Fatalf("known after a full round only: %+v", p)
	}
	rounds = append(rounds, cbt.Round{N: 2, Kind: "incremental", Start: t0.Add(200 * time.Second), Seconds: 12,
		Totals: cbt.RoundTotals{Changed: 200 << 20, Read: 200 << 20, CopySeconds: 10}})
	p := Project(rounds, 0)
	// change rate 200 MiB / 200 s = 1 MiB/s; 12 s until the final snapshot
	// → 12 MiB at 20 MiB/s = 0.6 s, plus 2 s of snapshot overhead.
	if !p.Known || p.ChangeRate != 1<<20 || p.CopyRate != 20<<20 || p.OverheadSeconds != 2 || p.FinalRoundSecond < 2.59 || p.FinalRoundSecond > 2.61 {
		t.Fatalf("%+v", p)
	}
	if p := Project(rounds, time.Minute); p.ExpectedChanged != 60<<20 {
		t.Fatalf("with a 1 minute interval: %+v", p)
	}
}
