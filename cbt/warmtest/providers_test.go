package warmtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/cbt"
	"github.com/vmdk2kvm/vmdk2kvm/filters"
	"github.com/vmdk2kvm/vmdk2kvm/internal/diskgen"
	"github.com/vmdk2kvm/vmdk2kvm/internal/testpeers"
	"github.com/vmdk2kvm/vmdk2kvm/internal/testutil"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
	"github.com/vmdk2kvm/vmdk2kvm/pipeline"
	"github.com/vmdk2kvm/vmdk2kvm/qcow2"
	"github.com/vmdk2kvm/vmdk2kvm/sinks"
	rawsink "github.com/vmdk2kvm/vmdk2kvm/sinks/raw"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
	sshsrc "github.com/vmdk2kvm/vmdk2kvm/sources/ssh"
	"github.com/vmdk2kvm/vmdk2kvm/sources/vmdk"
)

func newSinks() *sinks.Registry { return sinks.NewRegistry(rawsink.Format{}, qcow2.SinkFormat{}) }

// deltaSource is a standalone host without vCenter, reached over SSH: a
// round's snapshot is a new delta on top of the running one (qemu-img create
// -b), which freezes it; the chain is read in place over SFTP.
type deltaSource struct {
	t      *testing.T
	dir    string
	active string // the delta the guest writes now
	n      int
	reg    *sources.Registry
	sshURL string // ssh://user@127.0.0.1:port
}

func (s *deltaSource) Describe() string                            { return "esxi-ssh:" + s.dir }
func (s *deltaSource) Leftovers(context.Context) ([]string, error) { return nil, nil }
func (s *deltaSource) RemoveLeftovers(context.Context) error       { return nil }

func (s *deltaSource) open(ctx context.Context, name string) (*sources.Image, error) {
	return s.reg.Open(ctx, s.sshURL+filepath.Join(s.dir, name), sources.Options{Format: "vmdk"})
}

func (s *deltaSource) Freeze(ctx context.Context) (pipeline.Frozen, error) {
	s.n++
	frozen, next := s.active, fmt.Sprintf("disk-%06d.vmdk", s.n)
	testutil.Run(s.t, "qemu-img", "create", "-q", "-f", "vmdk", "-b", frozen, "-F", "vmdk", filepath.Join(s.dir, next))
	s.active = next
	img, err := s.open(ctx, frozen)
	if err != nil {
		return nil, err
	}
	chain, ok := img.Device.(cbt.Layered)
	if !ok {
		img.Close()
		return nil, fmt.Errorf("%T reports no layers", img.Device)
	}
	return &frozenChain{img: img, disks: []pipeline.FrozenDisk{{
		Key: "disk", Label: frozen, Capacity: img.Size(), Provider: &cbt.Delta{Chain: chain},
		Open: func(ctx context.Context) (block.Device, error) { return s.open(ctx, frozen) },
	}}}, nil
}

type frozenChain struct {
	img   *sources.Image
	disks []pipeline.FrozenDisk
}

func (f *frozenChain) Disks() []pipeline.FrozenDisk  { return f.disks }
func (f *frozenChain) Release(context.Context) error { return f.img.Close() }

func qemuIO(t *testing.T, format, file string, cmds ...string) {
	t.Helper()
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	testutil.Run(t, "qemu-io", append(args, file)...)
}

// The snapshot-delta provider: a chain grown with qemu-img create -b and
// written by qemu-io between rounds, read over SSH from a real sshd; each
// incremental round copies exactly the grains of the newly frozen delta.
func TestSnapshotDeltaOverSSH(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	rawDisk := filepath.Join(dir, "gen.raw")
	if _, err := diskgen.Write(ctx, rawDisk, 24<<20, 4); err != nil {
		t.Fatal(err)
	}
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", rawDisk, filepath.Join(dir, "disk.vmdk"))
	os.Remove(rawDisk)

	sshd := testpeers.StartSSHD(t, testpeers.SSHDOptions{})
	reg := sources.NewRegistry()
	reg.AddTransport(sshsrc.New(sshsrc.Config{
		User: sshd.User, KeyFiles: []string{sshd.KeyFile}, KnownHosts: []string{sshd.KnownHosts}, AgentSocket: "none",
		Cache: filters.CacheOptions{BlockSize: 64 << 10, Readahead: -1},
	}))
	reg.AddFormat(vmdk.Format{}).AddFormat(raw.Format{})
	src := &deltaSource{t: t, dir: dir, active: "disk.vmdk", reg: reg, sshURL: "ssh://" + sshd.User + "@" + sshd.Addr}
	target := t.TempDir()
	s, err := pipeline.OpenSync(pipeline.SyncConfig{Source: src, Target: target, Sinks: newSinks(), Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	oracle := filepath.Join(t.TempDir(), "oracle.raw")
	check := func(frozen string) cbt.Round {
		t.Helper()
		r, err := s.Round(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		// The replica equals the frozen chain as qemu reads it.
		testutil.Run(t, "qemu-img", "convert", "-f", "vmdk", "-O", "raw", filepath.Join(dir, frozen), oracle)
		testutil.Compare(t, "qcow2", filepath.Join(target, s.State.Disks[0].Replica), "raw", oracle)
		return r
	}
	r := check("disk.vmdk")
	if !r.Disks[0].Full {
		t.Fatal("round 1 was not full")
	}
	// The guest writes into the running delta (64 KiB grains).
	qemuIO(t, "vmdk", filepath.Join(dir, "disk-000001.vmdk"),
		"write -P 0xab 1M 128k", "write -P 0xcd 20M 64k", "write -z 4M 64k")
	r = check("disk-000001.vmdk")
	if r.Disks[0].Full || r.Totals.Changed != 256<<10 || r.Totals.Read > r.Totals.Changed {
		t.Fatalf("round 2: full=%v changed %d read %d, want 256 KiB changed and read at most", r.Disks[0].Full, r.Totals.Changed, r.Totals.Read)
	}
	qemuIO(t, "vmdk", filepath.Join(dir, "disk-000002.vmdk"), "write -P 0x11 1088k 64k", "write -P 0x22 23M 192k")
	r = check("disk-000002.vmdk")
	if r.Totals.Changed != 256<<10 {
		t.Fatalf("round 3 changed %d, want 256 KiB", r.Totals.Changed)
	}
	// A round with no writes copies nothing but advances the token.
	tok := s.State.Disks[0].Token
	r = check("disk-000003.vmdk")
	if r.Totals.Changed != 0 || s.State.Disks[0].Token == tok || !strings.Contains(s.State.Disks[0].Token, "disk-000003.vmdk") {
		t.Fatalf("round 4: changed %d token %q", r.Totals.Changed, s.State.Disks[0].Token)
	}
}

// bitmapSource is a qemu image with a persistent dirty bitmap: a round
// exports it with qemu-nbd -B and, once the round is committed, clears the
// bitmap (Release), so the next round sees only newer writes.
type bitmapSource struct {
	t     *testing.T
	img   string
	gen   int
	since string
}

func (s *bitmapSource) Describe() string                            { return "qemu:" + s.img }
func (s *bitmapSource) Leftovers(context.Context) ([]string, error) { return nil, nil }
func (s *bitmapSource) RemoveLeftovers(context.Context) error       { return nil }

func (s *bitmapSource) Freeze(ctx context.Context) (pipeline.Frozen, error) {
	sock := filepath.Join(s.t.TempDir(), "nbd.sock")
	cmd := exec.Command("qemu-nbd", "-f", "qcow2", "-r", "-t", "-e", "16", "-B", "b0", "-k", sock, s.img)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	stop := func() { cmd.Process.Kill(); cmd.Wait() }
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			stop()
			return nil, fmt.Errorf("qemu-nbd did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	uri := "nbd+unix:///?socket=" + sock
	c, err := nbd.Dial(ctx, uri, nbd.ClientOptions{MetaContexts: []string{"qemu:dirty-bitmap:b0"}})
	if err != nil {
		stop()
		return nil, err
	}
	s.gen++
	token := fmt.Sprintf("b0 generation %d", s.gen)
	f := &bitmapFrozen{s: s, client: c, stop: stop, token: token}
	f.disks = []pipeline.FrozenDisk{{
		Key: "disk", Label: filepath.Base(s.img), Capacity: c.Size(),
		Provider: &cbt.Bitmap{Export: c, Bitmap: "b0", Since: s.since, Token: token},
		Open: func(ctx context.Context) (block.Device, error) {
			return nbd.Dial(ctx, uri, nbd.ClientOptions{})
		},
	}}
	return f, nil
}

type bitmapFrozen struct {
	s      *bitmapSource
	client *nbd.Client
	stop   func()
	token  string
	disks  []pipeline.FrozenDisk
}

func (f *bitmapFrozen) Disks() []pipeline.FrozenDisk { return f.disks }

// Release runs after the state is committed: the bitmap starts over.
func (f *bitmapFrozen) Release(context.Context) error {
	f.client.Close()
	f.stop()
	testutil.Run(f.s.t, "qemu-img", "bitmap", "--clear", f.s.img, "b0")
	f.s.since = f.token
	return nil
}

// The dirty-bitmap provider: qemu-img bitmap --add, qemu-io writes,
// qemu-nbd -B; each incremental round copies the dirty ranges only.
func TestDirtyBitmapOverNBD(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	rawDisk := filepath.Join(dir, "gen.raw")
	if _, err := diskgen.Write(ctx, rawDisk, 24<<20, 6); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "vm.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", rawDisk, img)
	os.Remove(rawDisk)
	testutil.Run(t, "qemu-img", "bitmap", "--add", "-g", "65536", img, "b0")

	src := &bitmapSource{t: t, img: img}
	target := t.TempDir()
	s, err := pipeline.OpenSync(pipeline.SyncConfig{Source: src, Target: target, Format: "raw", Sinks: newSinks(), Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	round := func() cbt.Round {
		t.Helper()
		r, err := s.Round(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		testutil.Compare(t, "raw", filepath.Join(target, s.State.Disks[0].Replica), "qcow2", img)
		return r
	}
	if r := round(); !r.Disks[0].Full {
		t.Fatal("round 1 not full")
	}
	qemuIO(t, "qcow2", img, "write -P 0x5a 2M 64k", "write -P 0x5b 17M 300k", "discard 8M 1M")
	r := round()
	// 64 KiB + 320 KiB (300 KiB at 64 KiB granularity) + 1 MiB discarded.
	if want := int64(64<<10 + 320<<10 + 1<<20); r.Disks[0].Full || r.Totals.Changed != want {
		t.Fatalf("round 2: full=%v changed %d, want %d", r.Disks[0].Full, r.Totals.Changed, want)
	}
	r = round()
	if r.Totals.Changed != 0 {
		t.Fatalf("round 3 with no writes: changed %d", r.Totals.Changed)
	}
	qemuIO(t, "qcow2", img, "write -P 0x77 0 4k")
	if r := round(); r.Totals.Changed != 64<<10 {
		t.Fatalf("round 4: changed %d, want one 64 KiB bitmap granule", r.Totals.Changed)
	}
}
