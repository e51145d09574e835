package fixers_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/pipeline"
	"github.com/vmdk2kvm/vmdk2kvm/validate"
)

// The fixture, built once: binaries and the VMware-style Debian guest.
var (
	work     string // temp dir for the whole package
	binDir   string // vmdk2kvm + vmdk2kvm-guest
	goodDir  string // vmdk2kvm-fixer-linux, vmdk2kvm-fixer-motd (the example)
	guest    string // the monolithicSparse VMDK
	guestSum string
	setupErr error
)

const (
	byPath = "/dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0-part1"
	marker = "VMDK2KVM-BOOT-OK"
)

func repoRoot() string {
	d, _ := os.Getwd()
	for {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		p := filepath.Dir(d)
		if p == d {
			return "."
		}
		d = p
	}
}

func TestMain(m *testing.M) {
	var err error
	work, err = os.MkdirTemp("", "fixers-e2e-")
	if err != nil {
		panic(err)
	}
	setupErr = setup()
	code := m.Run()
	os.RemoveAll(work)
	os.Exit(code)
}

func goBuild(root, out, pkg string, cgo bool) error {
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if cgo {
		cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	}
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
	}
	return nil
}

func setup() error {
	root := repoRoot()
	binDir, goodDir = filepath.Join(work, "bin"), filepath.Join(work, "plugins")
	for _, d := range []string{binDir, goodDir} {
		os.MkdirAll(d, 0o755)
	}
	if _, err := os.Stat(filepath.Join(root, "third_party", "guestfs", "go.mod")); err != nil {
		return fmt.Errorf("the libguestfs Go binding is not vendored: run `make guestfs` (%v)", err)
	}
	builds := []struct {
		out, pkg string
		cgo      bool
	}{
		{filepath.Join(binDir, "vmdk2kvm"), "./cmd/vmdk2kvm", false},
		{filepath.Join(binDir, "vmdk2kvm-guest"), "./cmd/vmdk2kvm-guest", true},
		{filepath.Join(goodDir, "vmdk2kvm-fixer-linux"), "./cmd/vmdk2kvm-fixer-linux", false},
		{filepath.Join(goodDir, "vmdk2kvm-fixer-motd"), "./examples/fixer-motd", false},
		{filepath.Join(work, "badfixer"), "./plugins/testdata/badfixer", false},
	}
	var wg sync.WaitGroup
	errs := make([]error, len(builds))
	for i, b := range builds {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = goBuild(root, b.out, b.pkg, b.cgo) }()
	}
	guest = filepath.Join(work, "debian12-vmware.vmdk")
	cmd := exec.Command(filepath.Join(root, "testdata", "guest", "build-debian.sh"), guest)
	cmd.Stderr = os.Stderr
	gerr := cmd.Run()
	wg.Wait()
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	if gerr != nil {
		return fmt.Errorf("build the Debian guest: %w", gerr)
	}
	sum, err := fileSum(guest)
	guestSum = sum
	return err
}

func fixture(t *testing.T) {
	t.Helper()
	if setupErr != nil {
		t.Fatal(setupErr)
	}
}

func fileSum(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// badDir returns a plugin directory holding the bad fixer under the given modes.
func badDir(t *testing.T, modes ...string) string {
	d := t.TempDir()
	for _, m := range modes {
		if err := os.Link(filepath.Join(work, "badfixer"), filepath.Join(d, "vmdk2kvm-fixer-"+m)); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

func vmdk2kvm(ctx context.Context, args ...string) (string, string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "vmdk2kvm"), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.Env = append(os.Environ(), "VMDK2KVM_PLUGIN_PATH=", "HOME="+work)
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func assertSourceUntouched(t *testing.T) {
	t.Helper()
	if sum, err := fileSum(guest); err != nil || sum != guestSum {
		t.Fatalf("the source VMDK changed: %s -> %s (%v)", guestSum, sum, err)
	}
}

// assertNoImage checks a failed conversion left no image (final or temporary).
func assertNoImage(t *testing.T, dir string) {
	t.Helper()
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if !strings.Contains(e.Name(), ".fix-report.") {
			t.Errorf("partial output left behind: %s", e.Name())
		}
	}
}

// TestBadPlugins: each misbehaving plugin stops the run (default policy abort)
// before anything is written, with a clear reason.
func TestBadPlugins(t *testing.T) {
	fixture(t)
	linuxSum, err := fileSum(filepath.Join(goodDir, "vmdk2kvm-fixer-linux"))
	if err != nil {
		t.Fatal(err)
	}
	wrong := strings.Repeat("0", 64)
	cases := []struct {
		name  string
		modes []string
		extra []string
		want  []string
	}{
		{"crash", []string{"crash-describe"}, nil, []string{"plugin crash-describe", "crashed", "crashing in Describe on purpose"}},
		{"hang", []string{"hang-describe"}, []string{"--plugin-timeout", "3s"}, []string{"plugin hang-describe", "no answer within 3s: killed (hung)"}},
		{"handshake", []string{"badshake"}, nil, []string{"plugin badshake", "wrong handshake", "Plugin version: 99"}},
		{"sha256", nil, []string{"--plugin-sha256", "linux=" + wrong, "--plugin-sha256", "motd=" + mustSum(t, "vmdk2kvm-fixer-motd")},
			[]string{"plugin linux", "SHA-256 is " + linuxSum, "pinned " + wrong, "refusing to run it"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out := t.TempDir()
			dst := filepath.Join(out, "out.qcow2")
			args := append([]string{"convert", "--fix", "--no-default-plugin-dirs", "--plugin-dir", goodDir, "--plugin-dir", badDir(t, c.modes...)}, c.extra...)
			args = append(args, guest, dst)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			start := time.Now()
			_, stderr, err := vmdk2kvm(ctx, args...)
			if err == nil {
				t.Fatalf("convert succeeded with a bad plugin; stderr:\n%s", stderr)
			}
			for _, w := range c.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr)
				}
			}
			if !strings.Contains(stderr, "no output written") {
				t.Errorf("stderr does not say nothing was written:\n%s", stderr)
			}
			if _, err := os.Stat(dst); err == nil {
				t.Errorf("%s exists after a failed fix", dst)
			}
			assertNoImage(t, out)
			var rep pipeline.FixReport
			if b, err := os.ReadFile(dst + ".fix-report.json"); err != nil || json.Unmarshal(b, &rep) != nil || rep.Error == "" {
				t.Errorf("no failure report (%v): %+v", err, rep)
			}
			t.Logf("%s: refused in %s", c.name, time.Since(start).Round(time.Millisecond))
		})
	}
	assertSourceUntouched(t)
}

func mustSum(t *testing.T, name string) string {
	s, err := fileSum(filepath.Join(goodDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func pluginReport(t *testing.T, rep *pipeline.FixReport, name string) pipeline.PluginReport {
	t.Helper()
	for _, p := range rep.Plugins {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("no report for plugin %s: %+v", name, rep.Plugins)
	return pipeline.PluginReport{}
}

// TestConvertFixBoots is the proof: `plan` lists the fixes and changes
// nothing; the VMware-style guest converted without
// --fix does not boot on virtio-blk (and the console says why); converted with
// --fix it boots to multi-user with its NIC named as before and the example
// plugin's change in place; a second fix run plans nothing. Misbehaving
// plugins during planning are reported and skipped under
// --on-fixer-error=continue.
func TestConvertFixBoots(t *testing.T) {
	fixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	out := t.TempDir()
	unfixed, fixed := filepath.Join(out, "unfixed.qcow2"), filepath.Join(out, "fixed.qcow2")

	if _, stderr, err := vmdk2kvm(ctx, "convert", guest, unfixed); err != nil {
		t.Fatalf("convert without --fix: %v\n%s", err, stderr)
	}
	// Boot the unfixed disk while the fixed one is made.
	type bootRes struct {
		r   *validate.BootResult
		err error
	}
	unfixedBoot := make(chan bootRes, 1)
	go func() {
		r, err := validate.Boot(ctx, validate.BootOptions{Image: unfixed, Marker: marker, Timeout: 8 * time.Minute,
			Console: filepath.Join(out, "unfixed-console.log")})
		unfixedBoot <- bootRes{r, err}
	}()

	// PLAN only: the fixes are listed with their diffs, nothing is written.
	planOut, stderr, err := vmdk2kvm(ctx, "plan", "--no-default-plugin-dirs", "--plugin-dir", goodDir, guest)
	if err != nil {
		t.Fatalf("plan: %v\n%s", err, stderr)
	}
	for _, want := range []string{"# Fix plan: ", "## linux ", ": planned", "```diff\n--- a/etc/fstab\n+++ b/etc/fstab\n",
		"-" + byPath + " / ext4", "Regenerate the initramfs with the guest's own tool (update-initramfs -u -k all).",
		"Regenerate /boot/grub/grub.cfg with the guest's grub-mkconfig", "Mask the VMware service open-vm-tools.service",
		"Name the virtio NIC ens192", "## motd 1.0.0: planned"} {
		if !strings.Contains(planOut, want) {
			t.Errorf("plan output lacks %q:\n%s", want, planOut)
		}
	}
	if strings.Contains(planOut, "(done)") || strings.Contains(planOut, "Recorded guest mutations") {
		t.Errorf("plan claims it changed something:\n%s", planOut)
	}
	assertSourceUntouched(t)

	userData := filepath.Join(out, "user-data.yaml")
	os.WriteFile(userData, []byte("#cloud-config\nhostname: kvm-deb12\n"), 0o644)
	start := time.Now()
	_, stderr, err = vmdk2kvm(ctx, "convert", "--fix", "--on-fixer-error", "continue", "--cloud-init", userData, "--no-default-plugin-dirs",
		"--plugin-dir", goodDir, "--plugin-dir", badDir(t, "crash-plan", "write-in-plan"), guest, fixed)
	if err != nil {
		t.Fatalf("convert --fix: %v\n%s", err, stderr)
	}
	t.Logf("convert --fix took %s", time.Since(start).Round(time.Second))
	assertSourceUntouched(t)
	if b, err := exec.Command("qemu-img", "check", fixed).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check %s: %v\n%s", fixed, err, b)
	}

	var rep pipeline.FixReport
	b, err := os.ReadFile(fixed + ".fix-report.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Inspection == nil || rep.Inspection.Distro != "debian" || rep.Inspection.Version != "12."+strings.TrimPrefix(rep.Inspection.Version, "12.") {
		t.Fatalf("inspection: %+v", rep.Inspection)
	}
	lin := pluginReport(t, &rep, "linux")
	if lin.Status != pipeline.StatusApplied || len(lin.Done) != len(lin.Planned) {
		t.Fatalf("linux fixer: %s, %d of %d done, errors %v %s", lin.Status, len(lin.Done), len(lin.Planned), lin.Errors, lin.Error)
	}
	rootUUID := ""
	for _, f := range rep.Inspection.Filesystems {
		if f.Mountpoint == "/" {
			rootUUID = f.UUID
		}
	}
	wantDiffs := map[string]string{
		"/etc/fstab":                   "+UUID=" + rootUUID + " / ext4",
		"/boot/extlinux/extlinux.conf": "+  APPEND root=UUID=" + rootUUID,
		"/etc/initramfs-tools/modules": "+virtio_blk",
	}
	for path, want := range wantDiffs {
		found := false
		for _, a := range lin.Done {
			if a.Path == path && strings.Contains(a.Diff, want) && strings.Contains(a.Diff, "-") {
				found = true
			}
		}
		if !found {
			t.Errorf("linux fixer did not record a diff of %s containing %q", path, want)
		}
	}
	ops := map[string]bool{}
	for _, m := range lin.Mutations {
		ops[m.Op+" "+m.Path+strings.Join(m.Argv, " ")] = m.Error == ""
	}
	for _, want := range []string{"write /etc/fstab", "remove /etc/udev/rules.d/70-persistent-net.rules",
		"symlink /etc/systemd/system/open-vm-tools.service", "command update-initramfs -u -k all",
		"write /var/lib/cloud/seed/nocloud/user-data", "command grub-mkconfig -o /boot/grub/grub.cfg"} {
		if ok, seen := ops[want]; !seen || !ok {
			t.Errorf("host journal lacks successful %q: %v", want, ops)
		}
	}
	if p := pluginReport(t, &rep, "motd"); p.Status != pipeline.StatusApplied || len(p.Mutations) != 2 {
		t.Errorf("example plugin: %+v", p)
	}
	if p := pluginReport(t, &rep, "crash-plan"); p.Status != pipeline.StatusFailed || !strings.Contains(p.Error, "crashed") || !strings.Contains(p.Error, "crashing in Plan on purpose") {
		t.Errorf("crashing plugin: %s %q", p.Status, p.Error)
	}
	if p := pluginReport(t, &rep, "write-in-plan"); p.Status != pipeline.StatusFailed || !strings.Contains(p.Error, "read-only while planning") || len(p.Mutations) != 0 {
		t.Errorf("plugin writing while planning: %s %q %v", p.Status, p.Error, p.Mutations)
	}
	md, _ := os.ReadFile(fixed + ".fix-report.md")
	if !strings.Contains(string(md), "```diff\n--- a/etc/fstab") {
		t.Errorf("Markdown report lacks the fstab diff:\n%s", md)
	}

	fb, err := validate.Boot(ctx, validate.BootOptions{Image: fixed, Marker: marker, Timeout: 8 * time.Minute,
		Console: filepath.Join(out, "fixed-console.log")})
	if err != nil {
		t.Fatal(err)
	}
	if !fb.Reached {
		t.Fatalf("the fixed guest did not boot: %s\nconsole tail:\n%s", fb.Reason, tail(fb.Console, 3000))
	}
	t.Logf("fixed guest booted in %s: %s", fb.Elapsed.Round(time.Second), fb.Line)
	for _, want := range []string{"root=/dev/vda1", "nics=ens192 lo", "motd=vmware-deb12 was migrated from VMware to KVM by vmdk2kvm."} {
		if !strings.Contains(fb.Line, want) {
			t.Errorf("boot marker %q lacks %q", fb.Line, want)
		}
	}

	ub := <-unfixedBoot
	if ub.err != nil {
		t.Fatal(ub.err)
	}
	if ub.r.Reached {
		t.Fatalf("the unfixed guest booted: %s", ub.r.Line)
	}
	if !strings.Contains(ub.r.Reason, byPath+" does not exist") {
		t.Errorf("unfixed boot failed for another reason: %s", ub.r.Reason)
	}
	t.Logf("unfixed guest did not boot (%s): %s", ub.r.Elapsed.Round(time.Second), ub.r.Reason)

	// Second run on the converted image: the Linux fixer and the example plan
	// nothing. A plugin crashing while planning then aborts the run (the
	// default policy): the image is left exactly as it was, no overlay behind.
	fixedSum, err := fileSum(fixed)
	if err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := vmdk2kvm(ctx, "fix", "--json", "--no-default-plugin-dirs", "--plugin-dir", goodDir,
		"--plugin-dir", badDir(t, "crash-plan"), fixed)
	if err == nil || !strings.Contains(stderr, "the image is unchanged") || !strings.Contains(stderr, "crashing in Plan on purpose") {
		t.Fatalf("second fix with a crashing plugin: want an abort, got %v\n%s", err, stderr)
	}
	var rep2 pipeline.FixReport
	if err := json.Unmarshal([]byte(stdout), &rep2); err != nil {
		t.Fatalf("second fix report: %v\n%s", err, stdout)
	}
	for _, name := range []string{"linux", "motd"} {
		p := pluginReport(t, &rep2, name)
		if p.Status != pipeline.StatusNothing || len(p.Planned) != 0 || len(p.Mutations) != 0 {
			t.Errorf("second run: plugin %s %s, planned %+v", p.Name, p.Status, p.Planned)
		}
	}
	if p := pluginReport(t, &rep2, "crash-plan"); p.Status != pipeline.StatusFailed {
		t.Errorf("crash-plan: %+v", p)
	}
	if sum, err := fileSum(fixed); err != nil || sum != fixedSum {
		t.Errorf("an aborted fix changed the image (%v)", err)
	}
	if _, err := os.Stat(fixed + ".fix-overlay.qcow2"); err == nil {
		t.Error("the fix overlay was left behind")
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// TestPluginsList: `vmdk2kvm plugins list` shows each plugin found, its
// version and what it applies to, and reports a broken one without failing.
func TestPluginsList(t *testing.T) {
	fixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stdout, stderr, err := vmdk2kvm(ctx, "plugins", "list", "--json", "--no-default-plugin-dirs",
		"--plugin-dir", goodDir, "--plugin-dir", badDir(t, "badshake"))
	if err != nil {
		t.Fatalf("plugins list: %v\n%s", err, stderr)
	}
	var got struct {
		Plugins []struct {
			Name, Version, Path, SHA256, Error string
			OSTypes                            []string `json:"os_types"`
			Order                              int
		}
	}
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatalf("%v\n%s", err, stdout)
	}
	if len(got.Plugins) != 3 {
		t.Fatalf("want badshake, linux, motd; got %+v", got.Plugins)
	}
	b, l, m := got.Plugins[0], got.Plugins[1], got.Plugins[2]
	if b.Name != "badshake" || !strings.Contains(b.Error, "wrong handshake") {
		t.Errorf("badshake: %+v", b)
	}
	if l.Name != "linux" || l.Version == "" || len(l.OSTypes) != 1 || l.OSTypes[0] != "linux" || l.SHA256 != mustSum(t, "vmdk2kvm-fixer-linux") {
		t.Errorf("linux: %+v", l)
	}
	if m.Name != "motd" || m.Version != "1.0.0" || m.Order != 50 {
		t.Errorf("motd: %+v", m)
	}
	text, _, err := vmdk2kvm(ctx, "plugins", "list", "--no-default-plugin-dirs", "--plugin-dir", goodDir)
	if err != nil || !strings.Contains(text, "NAME") || !strings.Contains(text, "linux  ") {
		t.Errorf("text listing (%v):\n%s", err, text)
	}
}
