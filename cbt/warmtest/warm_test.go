package warmtest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmware/govmomi/object"

	"github.com/vmdk2kvm/vmdk2kvm/cbt"
	"github.com/vmdk2kvm/vmdk2kvm/cbt/cbttest"
	"github.com/vmdk2kvm/vmdk2kvm/internal/testutil"
	"github.com/vmdk2kvm/vmdk2kvm/pipeline"
	"github.com/vmdk2kvm/vmdk2kvm/vmware/vmwaretest"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "warmtest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "vmdk2kvm")
	root, _ := filepath.Abs("../..")
	cmd := exec.Command("go", "build", "-o", binary, "./cmd/vmdk2kvm")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building vmdk2kvm: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// uri is the VM's vsphere:// URI through the harness's counting proxy.
func uri(h *cbttest.Harness) string {
	return fmt.Sprintf("vsphere://%s@%s/%s/vm/%s", vmwaretest.User, h.Proxy.URL.Host, vmwaretest.Datacenter, h.Name)
}

// args puts the flags before the URI (urfave/cli stops at the first argument).
func args(sub, uri string, flags ...string) []string {
	return append(append([]string{sub}, flags...), uri)
}

func command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, binary, args...)
	// The password comes from the environment, never from argv.
	cmd.Env = append(os.Environ(), "VMDK2KVM_PASSWORD="+vmwaretest.Password)
	return cmd
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := command(ctx, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("vmdk2kvm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func replica(t *testing.T, target string) string {
	t.Helper()
	st, err := cbt.LoadState(filepath.Join(target, cbt.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(target, st.Disks[0].Replica)
}

// sync, cutover, reports: the replica equals the disk after every round,
// incremental rounds read the changed bytes, the replica stays pristine
// under the cutover overlay.
func TestSyncAndCutoverCLI(t *testing.T) {
	h := cbttest.New(t, cbttest.Options{Size: 32 << 20, Seed: 5, PoweredOn: true})
	target := t.TempDir()
	common := []string{"--target", target, "--insecure"}

	// Round 1 turns CBT on (the stun is the round's snapshot) and copies
	// the allocated areas.
	out := run(t, args("sync", uri(h), append(common, "--enable-cbt")...)...)
	if !strings.Contains(out, "round 1 (full)") {
		t.Fatalf("round 1 output:\n%s", out)
	}
	testutil.Compare(t, "qcow2", replica(t, target), "raw", h.Flat)

	for i := range 2 {
		wrote, err := h.WriteRandomRuns(uint64(10+i), 8, 64<<10, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		h.Proxy.Reset()
		out = run(t, args("sync", uri(h), append(common, "--report")...)...)
		testutil.Compare(t, "qcow2", replica(t, target), "raw", h.Flat)
		st, err := cbt.LoadState(filepath.Join(target, cbt.StateFile))
		if err != nil {
			t.Fatal(err)
		}
		changed := st.Rounds[len(st.Rounds)-1].Totals.Changed
		// Counted at the server: at least the changed bytes (the reads
		// really went through the datastore), at most 10% more.
		if got := h.Proxy.FolderBytes(); changed == 0 || changed > wrote || got < changed || got > changed+changed/10+64<<10 {
			t.Fatalf("incremental round: datastore served %d bytes for %d changed (%d written)", got, changed, wrote)
		}
		if !strings.Contains(out, "(incremental)") {
			t.Fatalf("output:\n%s", out)
		}
	}
	var rep struct {
		Rounds []cbt.Round `json:"rounds"`
	}
	b, err := os.ReadFile(filepath.Join(target, "sync-report.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &rep); err != nil || len(rep.Rounds) != 3 {
		t.Fatalf("report: %v, %d rounds", err, len(rep.Rounds))
	}
	if html, err := os.ReadFile(filepath.Join(target, "sync-report.html")); err != nil || !strings.Contains(string(html), "<svg") {
		t.Fatalf("html report: %v", err)
	}

	// The guest writes once more, then the cutover stops it and runs the
	// final round; the overlay reads as the disk, the replica too.
	if _, err := h.WriteRandomRuns(20, 4, 64<<10, 256<<10); err != nil {
		t.Fatal(err)
	}
	rep0 := replica(t, target)
	sum0 := testutil.Run(t, "sha256sum", rep0)
	out = run(t, args("cutover", uri(h), append(common, "--no-fix", "--shutdown-timeout", "10s")...)...)
	if !strings.Contains(out, "downtime") {
		t.Fatalf("cutover output:\n%s", out)
	}
	st, err := cbt.LoadState(filepath.Join(target, cbt.StateFile))
	if err != nil || st.Cutover == nil {
		t.Fatalf("state after cutover: %v", err)
	}
	overlay := filepath.Join(target, st.Cutover.Overlays[0])
	testutil.Compare(t, "qcow2", overlay, "raw", h.Flat)
	testutil.Compare(t, "qcow2", replica(t, target), "raw", h.Flat)
	if sum0 == testutil.Run(t, "sha256sum", rep0) {
		t.Fatal("the final round did not update the replica")
	}
	if info := testutil.Run(t, "qemu-img", "info", overlay); !strings.Contains(info, "backing file: "+filepath.Base(rep0)) {
		t.Fatalf("overlay is not over the replica:\n%s", info)
	}
	xml, err := os.ReadFile(filepath.Join(target, st.Cutover.DomainXML))
	if err != nil || !strings.Contains(string(xml), overlay) || !strings.Contains(string(xml), "<name>"+h.Name+"</name>") {
		t.Fatalf("domain XML does not boot the overlay %s: %v\n%s", overlay, err, xml)
	}
	if st.Rounds[len(st.Rounds)-1].Kind != "final" || st.Cutover.DowntimeSeconds <= 0 {
		t.Fatalf("cutover state %+v", st.Cutover)
	}
}

// SIGKILL at chosen steps of a round, then a resumed run: the replica ends
// identical to the disk every time, and no migration snapshot survives the
// resumed run.
func TestCrashSafety(t *testing.T) {
	h := cbttest.New(t, cbttest.Options{Size: 16 << 20, Seed: 9, CBT: true, PoweredOn: true})
	target := t.TempDir()
	common := []string{"--target", target, "--insecure", "--yes"}
	points := []string{"copy", "frozen", "flushed", "committed", "before-release", "released"}
	r := rand.New(rand.NewPCG(42, 42))
	killedAt := map[string]int{}
	for trial := range 20 {
		if trial > 0 {
			if _, err := h.WriteRandomRuns(uint64(100+trial), 1+r.IntN(6), 4<<10, 512<<10); err != nil {
				t.Fatal(err)
			}
			if trial%5 == 0 {
				if err := h.Discard(r.Int64N(15)<<20, 1<<20); err != nil {
					t.Fatal(err)
				}
			}
		}
		point := points[trial%len(points)]
		// The hook pauses 30 ms at each step: a kill within 20 ms lands at
		// that step; after "copy" it lands 30-90 ms later, inside the copy
		// (each later step still pauses, so the process is still alive).
		delay := time.Duration(r.IntN(20)) * time.Millisecond
		if point == "copy" {
			delay = time.Duration(30+r.IntN(60)) * time.Millisecond
		}
		if killSyncAt(t, h, common, point, delay) {
			killedAt[point]++
		}
		run(t, args("sync", uri(h), common...)...)
		testutil.Compare(t, "qcow2", replica(t, target), "raw", h.Flat)
		testutil.Run(t, "qemu-img", "check", replica(t, target))
		if snaps, err := h.Snapshots(context.Background()); err != nil || len(snaps) != 0 {
			t.Fatalf("trial %d: snapshots after the resumed run: %v %v", trial, snaps, err)
		}
		if part, _ := filepath.Glob(filepath.Join(target, ".*.part-*")); len(part) != 0 {
			t.Fatalf("trial %d: unfinished outputs left: %v", trial, part)
		}
	}
	for _, p := range points {
		if killedAt[p] == 0 {
			t.Errorf("no run was killed at %s: %v", p, killedAt)
		}
	}
	t.Logf("killed at: %v", killedAt)
}

// killSyncAt starts sync with the test hook on, waits for the named step,
// sleeps delay and SIGKILLs it. It reports whether the kill landed before
// the process ended by itself.
func killSyncAt(t *testing.T, h *cbttest.Harness, common []string, point string, delay time.Duration) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := command(ctx, args("sync", uri(h), common...)...)
	cmd.Env = append(cmd.Env, "VMDK2KVM_TEST_HOOK_PAUSE=30ms")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stderr)
	killed := false
	for sc.Scan() {
		if sc.Text() == "sync-hook: "+point {
			time.Sleep(delay)
			killed = cmd.Process.Signal(syscall.SIGKILL) == nil
			break
		}
	}
	go io.Copy(io.Discard, stderr)
	err = cmd.Wait()
	if killed {
		if ee, ok := err.(*exec.ExitError); !ok || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			// It finished before the signal landed.
			return false
		}
	}
	return killed
}

// A migration snapshot left by a killed run: without --yes and without a
// terminal, sync refuses with a clear message and changes nothing; with
// --yes it removes it and runs the round.
func TestLeftoverSnapshotCLI(t *testing.T) {
	ctx := context.Background()
	h := cbttest.New(t, cbttest.Options{Size: 8 << 20, CBT: true, PoweredOn: true})
	vm := object.NewVirtualMachine(h.Env.Client.Client, h.VM)
	task, err := vm.CreateSnapshot(ctx, pipeline.MigrationSnapshot, "", false, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := command(cctx, args("sync", uri(h), "--target", target, "--insecure")...)
	cmd.Stdin = nil
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // no controlling terminal to prompt on
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "leftover migration snapshot") || !strings.Contains(string(out), "--yes") {
		t.Fatalf("without --yes: %v\n%s", err, out)
	}
	if snaps, _ := h.Snapshots(ctx); len(snaps) != 1 {
		t.Fatalf("snapshots after the refusal: %v", snaps)
	}
	if _, err := os.Stat(filepath.Join(target, cbt.StateFile)); err == nil {
		t.Fatal("state written although nothing was synced")
	}
	out2 := run(t, args("sync", uri(h), "--target", target, "--insecure", "--yes")...)
	if !strings.Contains(out2, "removing leftover migration snapshot") {
		t.Fatalf("with --yes:\n%s", out2)
	}
	if snaps, _ := h.Snapshots(ctx); len(snaps) != 0 {
		t.Fatalf("snapshots after the round: %v", snaps)
	}
	testutil.Compare(t, "qcow2", replica(t, target), "raw", h.Flat)
}

// A password in the URI (it would show in the process list) is refused
// before anything is contacted.
func TestPasswordNotInArgv(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := command(ctx, "sync", "--target", t.TempDir(), "vsphere://root:s3cret@127.0.0.1:1/DC0/vm/x").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "password") || strings.Contains(string(out), "s3cret") {
		t.Fatalf("%v\n%s", err, out)
	}
}

// Two disks: one replica and one overlay each, both equal to their disk
// after every round, both in the domain.
func TestTwoDisksCLI(t *testing.T) {
	h := cbttest.New(t, cbttest.Options{Size: 16 << 20, SecondDisk: 8 << 20, Seed: 11, CBT: true, PoweredOn: true})
	target := t.TempDir()
	common := []string{"--target", target, "--insecure"}
	flats := map[string]string{"2000": h.Flat, "2001": h.Flat2}
	compareAll := func(overlays bool) {
		t.Helper()
		st, err := cbt.LoadState(filepath.Join(target, cbt.StateFile))
		if err != nil || len(st.Disks) != 2 || st.Disks[0].Replica == st.Disks[1].Replica {
			t.Fatalf("state: %v %+v", err, st)
		}
		for i, d := range st.Disks {
			testutil.Compare(t, "qcow2", filepath.Join(target, d.Replica), "raw", flats[d.Key])
			if overlays {
				testutil.Compare(t, "qcow2", filepath.Join(target, st.Cutover.Overlays[i]), "raw", flats[d.Key])
			}
		}
	}
	run(t, args("sync", uri(h), common...)...)
	compareAll(false)
	p := make([]byte, 192<<10)
	for i := range p {
		p[i] = byte(i * 13)
	}
	if err := h.WriteDisk(cbttest.SecondDiskKey, 5<<20, p); err != nil {
		t.Fatal(err)
	}
	if err := h.Write(1<<20, p[:64<<10]); err != nil {
		t.Fatal(err)
	}
	run(t, args("sync", uri(h), common...)...)
	compareAll(false)
	if err := h.WriteDisk(cbttest.SecondDiskKey, 7<<20, p[:4096]); err != nil {
		t.Fatal(err)
	}
	run(t, args("cutover", uri(h), append(common, "--no-fix")...)...)
	compareAll(true)
	st, _ := cbt.LoadState(filepath.Join(target, cbt.StateFile))
	xml, err := os.ReadFile(filepath.Join(target, st.Cutover.DomainXML))
	if err != nil {
		t.Fatal(err)
	}
	for _, ov := range st.Cutover.Overlays {
		if !strings.Contains(string(xml), filepath.Join(target, ov)) {
			t.Fatalf("domain misses %s:\n%s", ov, xml)
		}
	}
	if got := st.Rounds[1].Totals.Changed; got != 192<<10+64<<10 {
		t.Fatalf("round 2 changed %d bytes over both disks, want %d", got, 192<<10+64<<10)
	}
}
