package plugins

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pb "github.com/vmdk2kvm/vmdk2kvm/plugins/proto"
)

// binDir holds real plugin binaries built once for the package's tests.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "plugins-test-")
	if err != nil {
		panic(err)
	}
	binDir = dir
	build := func(pkg, name string) {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, name), pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			panic("build " + pkg + ": " + err.Error() + "\n" + string(out))
		}
	}
	build("../examples/fixer-motd", BinaryPrefix+"motd")
	build("./testdata/badfixer", BinaryPrefix+"crash-describe")
	for _, n := range []string{"hang-describe", "badshake"} {
		if err := os.Link(filepath.Join(dir, BinaryPrefix+"crash-describe"), filepath.Join(dir, BinaryPrefix+n)); err != nil {
			panic(err)
		}
	}
	os.WriteFile(filepath.Join(dir, BinaryPrefix+"not-executable"), []byte("#!/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "other-tool"), []byte("#!/bin/sh\n"), 0o755)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func found(t *testing.T, name string) Found {
	t.Helper()
	fs, err := Discover([]string{binDir})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fs {
		if f.Name == name {
			return f
		}
	}
	t.Fatalf("plugin %s not discovered in %v", name, fs)
	return Found{}
}

func TestDiscoverOrderAndShadowing(t *testing.T) {
	first := t.TempDir()
	shadow := filepath.Join(first, BinaryPrefix+"motd")
	if err := os.Link(filepath.Join(binDir, BinaryPrefix+"motd"), shadow); err != nil {
		t.Fatal(err)
	}
	fs, err := Discover([]string{first, binDir, filepath.Join(first, "missing")})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range fs {
		names = append(names, f.Name)
	}
	want := "badshake crash-describe hang-describe motd"
	if strings.Join(names, " ") != want {
		t.Fatalf("discovered %v, want %s (sorted; non-executables and other names ignored)", names, want)
	}
	m := fs[3]
	if m.Path != shadow || len(m.Shadowed) != 1 || m.Shadowed[0] != filepath.Join(binDir, BinaryPrefix+"motd") {
		t.Fatalf("motd: first directory must win, got %+v", m)
	}
}

func TestSearchPathPrecedence(t *testing.T) {
	t.Setenv(EnvPluginPath, "/a:/b")
	got := SearchPath([]string{"/cli"})
	if len(got) < 4 || got[0] != "/cli" || got[1] != "/a" || got[2] != "/b" {
		t.Fatalf("search path %v: want --plugin-dir, then $%s, then binary dir, then ~/.local", got, EnvPluginPath)
	}
	if !strings.HasSuffix(got[len(got)-1], ".local/lib/vmdk2kvm/plugins") {
		t.Fatalf("last entry %q", got[len(got)-1])
	}
}

func TestLaunchDescribe(t *testing.T) {
	f := found(t, "motd")
	sum, err := FileSHA256(f.Path)
	if err != nil {
		t.Fatal(err)
	}
	p, err := Launch(context.Background(), f, LaunchOptions{SHA256: sum, Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	if p.Desc.Name != "motd" || p.Desc.Version != "1.0.0" || p.Desc.OSTypes[0] != "linux" || p.Desc.After[0] != "linux" {
		t.Fatalf("description %+v", p.Desc)
	}
	if p.SHA256 != sum {
		t.Fatalf("sha %s, want %s", p.SHA256, sum)
	}
}

func TestLaunchWrongSHA256(t *testing.T) {
	f := found(t, "motd")
	wrong := strings.Repeat("ab", 32)
	_, err := Launch(context.Background(), f, LaunchOptions{SHA256: wrong, Timeout: time.Minute})
	if err == nil || !strings.Contains(err.Error(), "pinned "+wrong) || !strings.Contains(err.Error(), "refusing") {
		t.Fatalf("want a refusal naming the pinned sum, got %v", err)
	}
	if _, err := Launch(context.Background(), f, LaunchOptions{SHA256: "xyz"}); err == nil || !strings.Contains(err.Error(), "64 hex digits") {
		t.Fatalf("malformed pin: %v", err)
	}
}

func TestLaunchCrash(t *testing.T) {
	_, err := Launch(context.Background(), found(t, "crash-describe"), LaunchOptions{Timeout: time.Minute})
	if err == nil || !strings.Contains(err.Error(), "crashed") || !strings.Contains(err.Error(), "crashing in Describe on purpose") {
		t.Fatalf("want a crash report with the plugin's stderr, got %v", err)
	}
}

func TestLaunchHang(t *testing.T) {
	f := found(t, "hang-describe")
	start := time.Now()
	_, err := Launch(context.Background(), f, LaunchOptions{Timeout: 2 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "no answer within 2s: killed (hung)") {
		t.Fatalf("want a hang report, got %v", err)
	}
	if time.Since(start) > 30*time.Second {
		t.Fatalf("hung plugin was not killed in time (%s)", time.Since(start))
	}
	// The process is gone: no plugin process with that path is left.
	out, _ := exec.Command("pgrep", "-f", f.Path).Output()
	if strings.TrimSpace(string(out)) != "" {
		t.Fatalf("hung plugin still running: pids %s", out)
	}
}

func TestLaunchWrongHandshake(t *testing.T) {
	_, err := Launch(context.Background(), found(t, "badshake"), LaunchOptions{Timeout: time.Minute})
	if err == nil || !strings.Contains(err.Error(), "wrong handshake") || !strings.Contains(err.Error(), "Plugin version: 99") {
		t.Fatalf("want a protocol version error, got %v", err)
	}
}

func TestOrder(t *testing.T) {
	mk := func(name string, order int, after ...string) *Plugin {
		return &Plugin{Found: Found{Name: name}, Desc: Description{Name: name, Order: order, After: after}}
	}
	got, err := Order([]*Plugin{mk("zeta", 10), mk("motd", 50, "linux"), mk("alpha", 10, "zeta"), mk("linux", 60)})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range got {
		names = append(names, p.Desc.Name)
	}
	if strings.Join(names, " ") != "zeta alpha linux motd" {
		t.Fatalf("order %v", names)
	}
	if _, err := Order([]*Plugin{mk("a", 0, "b"), mk("b", 0, "a")}); err == nil {
		t.Fatal("cycle not reported")
	}
}

func TestSkipReason(t *testing.T) {
	d := Description{Name: "linux", OSTypes: []string{"linux"}, Distros: []string{"debian", "ubuntu"}, MinVersion: "10", MaxVersion: "12.9"}
	cases := []struct {
		in   *pb.Inspection
		skip string
	}{
		{&pb.Inspection{OsType: "windows", Distro: "windows", Major: 10}, `this one is "windows"`},
		{&pb.Inspection{OsType: "linux", Distro: "rhel", Major: 9}, `this guest is "rhel"`},
		{&pb.Inspection{OsType: "linux", Distro: "debian", Major: 9}, "needs version >= 10"},
		{&pb.Inspection{OsType: "linux", Distro: "debian", Major: 13}, "needs version <= 12.9"},
		{&pb.Inspection{OsType: "linux", Distro: "debian", Major: 12, Minor: 5}, ""},
	}
	for _, c := range cases {
		got := SkipReason(d, c.in)
		if (c.skip == "") != (got == "") || !strings.Contains(got, c.skip) {
			t.Errorf("%v: skip %q, want %q", c.in, got, c.skip)
		}
	}
}
