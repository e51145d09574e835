package main

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/vmdk2kvm/vmdk2kvm/pipeline"
	"github.com/vmdk2kvm/vmdk2kvm/vmware"
	"github.com/vmdk2kvm/vmdk2kvm/vmware/vmwaretest"
)

// buildVSphereCLI builds the binary into the calling test's temporary folder.
func buildVSphereCLI(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "vmdk2kvm")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

type cliResult struct {
	stdout, stderr string
	code           int
}

// run runs the CLI with the password in the environment (never in argv).
func run(t *testing.T, bin, password string, args ...string) cliResult {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "VMDK2KVM_PASSWORD="+password, "VMDK2KVM_VCENTER=", "VMDK2KVM_USER=")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	r := cliResult{out.String(), errb.String(), code}
	if strings.Contains(r.stdout+r.stderr, password) {
		t.Fatalf("the password appears in the output of %v:\n%s\n%s", args, r.stdout, r.stderr)
	}
	if strings.Contains(r.stderr, "goroutine ") || strings.Contains(r.stderr, "panic") {
		t.Fatalf("stack trace from %v:\n%s", args, r.stderr)
	}
	return r
}

// failsInOneLine asserts a failure: exit ≠ 0, one line on stderr naming want.
func failsInOneLine(t *testing.T, r cliResult, want string) {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	if r.code == 0 || len(lines) != 1 || !strings.Contains(r.stderr, want) || !strings.HasPrefix(lines[0], "vmdk2kvm: ") {
		t.Fatalf("want exit ≠ 0 and one line with %q; got exit %d, stderr:\n%s", want, r.code, r.stderr)
	}
}

// TestVSphereCLI runs the built binary against the simulator: errors first,
// then every vsphere command and plan.
func TestVSphereCLI(t *testing.T) {
	bin := buildVSphereCLI(t)
	t.Run("errors", func(t *testing.T) { vsphereCLIErrors(t, bin) })
	t.Run("commands", func(t *testing.T) { vsphereCLICommands(t, bin) })
}

func vsphereCLIErrors(t *testing.T, bin string) {
	env := vmwaretest.New(t)
	pw := vmwaretest.Password
	conn := []string{"--vcenter", env.URL.Host, "--user", vmwaretest.User}
	tp := []string{"--thumbprint", env.Thumbprint()}

	// A self-signed certificate without --thumbprint: the thumbprint is printed with how to pin it.
	r := run(t, bin, pw, append(append([]string{"vsphere", "info"}, conn...), vmwaretest.VMWeb)...)
	failsInOneLine(t, r, "--thumbprint "+env.Thumbprint())

	// Wrong password.
	r = run(t, bin, "wrong-"+pw, append(append(append([]string{"vsphere", "info"}, conn...), tp...), vmwaretest.VMWeb)...)
	failsInOneLine(t, r, "wrong user name or password")

	// Unknown VM.
	r = run(t, bin, pw, append(append(append([]string{"vsphere", "info"}, conn...), tp...), "no-such-vm")...)
	failsInOneLine(t, r, `no VM "no-such-vm"`)

	// Unreachable host.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := l.Addr().String()
	l.Close()
	r = run(t, bin, pw, "plan", "vsphere://"+vmwaretest.User+"@"+dead+"/DC0/vm/web01")
	failsInOneLine(t, r, "cannot reach "+dead)

	// A password in the URI is refused without echoing it.
	r = run(t, bin, pw, "plan", "vsphere://u:"+pw+"@"+env.URL.Host+"/DC0/vm/web01")
	failsInOneLine(t, r, "must not carry a password")

	// CBT needs consent.
	r = run(t, bin, pw, append(append(append([]string{"vsphere", "cbt", "enable"}, conn...), tp...), vmwaretest.VMDB)...)
	failsInOneLine(t, r, "--yes")
}

func vsphereCLICommands(t *testing.T, bin string) {
	env := vmwaretest.New(t)
	pw := vmwaretest.Password
	conn := []string{"--vcenter", env.URL.Host, "--user", vmwaretest.User, "--thumbprint", env.Thumbprint()}
	ok := func(args ...string) string {
		t.Helper()
		r := run(t, bin, pw, args...)
		if r.code != 0 {
			t.Fatalf("%v: exit %d\n%s", args, r.code, r.stderr)
		}
		return r.stdout
	}
	vs := func(sub ...string) []string {
		return append(append([]string{"vsphere"}, sub[:len(sub)-1]...), append(conn, sub[len(sub)-1])...)
	}

	if r := run(t, bin, pw, "vsphere", "ls", "--vcenter", env.URL.Host, "--user", vmwaretest.User, "--insecure", "/"); r.code != 0 || !strings.Contains(r.stderr, "warning: --insecure") || !strings.Contains(r.stdout, "DC1") {
		t.Fatalf("--insecure: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if out := ok(vs("ls", "/DC0/vm")...); !strings.Contains(out, "web01") || !strings.Contains(out, "VirtualMachine") {
		t.Fatalf("ls:\n%s", out)
	}
	var info vmware.VMInfo
	if err := json.Unmarshal([]byte(ok(append(vs("info", "win01"), "--json")...)), &info); err != nil || info.Name != "win01" || info.Firmware != "efi" {
		t.Fatalf("info --json: %+v %v", info, err)
	}
	if out := ok(vs("info", "web01")...); !strings.Contains(out, vmwaretest.Web01MAC1) || !strings.Contains(out, "pre-upgrade") {
		t.Fatalf("info:\n%s", out)
	}
	// Flags after the VM, as the issue writes them.
	xml := ok(append(vs("domain-xml", "web01"), "--network-map", vmwaretest.Network1+"=lan", "--domain-type", "qemu", "--sata")...)
	var d libvirtxml.Domain
	if err := d.Unmarshal(xml); err != nil || d.Type != "qemu" || d.Devices.Disks[0].Target.Bus != "sata" || d.Devices.Interfaces[0].Source.Network.Network != "lan" {
		t.Fatalf("domain-xml: %v\n%s", err, xml)
	}
	// Snapshots and CBT on db01.
	ok(append(append([]string{"vsphere", "snapshot", "create"}, conn...), "db01", "s1")...)
	if out := ok(append(append([]string{"vsphere", "snapshot", "list"}, conn...), "db01")...); !strings.Contains(out, "s1") || !strings.Contains(out, "current") {
		t.Fatalf("list:\n%s", out)
	}
	ok(append(append([]string{"vsphere", "snapshot", "remove"}, conn...), "db01", "s1")...)
	if out := ok(append(append([]string{"vsphere", "cbt", "enable"}, conn...), "db01", "--yes")...); !strings.Contains(out, "CBT enabled") {
		t.Fatalf("cbt:\n%s", out)
	}
	if out := ok(append(vs("disks", "linked01"), "--json")...); !strings.Contains(out, "linked01-000001-sesparse.vmdk") {
		t.Fatalf("disks:\n%s", out)
	}

	// plan vsphere://user@vcenter/DC/vm/NAME: text, JSON, and a saved YAML that loads back.
	uri := "vsphere://" + vmwaretest.User + "@" + env.URL.Host + "/DC0/vm/win01"
	dir := t.TempDir()
	saved := filepath.Join(dir, "plan.yaml")
	text := ok("plan", uri, "--thumbprint", env.Thumbprint(), "--output-dir", dir, "--domain-type", "qemu", "--save", saved)
	for _, s := range []string{"nvme0:0", "(cbt)", "win01-disk0.qcow2", "Fixes", "secure boot"} {
		if !strings.Contains(text, s) {
			t.Errorf("plan text lacks %q:\n%s", s, text)
		}
	}
	p, err := pipeline.ParsePlan([]byte(ok("plan", uri, "--thumbprint", env.Thumbprint(), "--output-dir", dir, "--domain-type", "qemu", "--json")))
	if err != nil || p.Source != uri || p.Disks[0].AllocatedSource != "cbt" {
		t.Fatalf("plan --json: %+v %v", p, err)
	}
	back, err := pipeline.LoadPlan(saved)
	if err != nil || back.VM.MoRef != p.VM.MoRef || back.Disks[0].AllocatedBytes != p.Disks[0].AllocatedBytes {
		t.Fatalf("saved plan: %+v %v", back, err)
	}
	t.Logf("vmdk2kvm plan %s\n%s", uri, text)
}

func TestParseRate(t *testing.T) {
	for in, want := range map[string]int64{"100MiB": 100 << 20, "1.5GiB": 3 << 29, "500M": 500 << 20, "4096": 4096, "64KiB/s": 64 << 10} {
		if got, err := parseRate(in); err != nil || got != want {
			t.Errorf("%s: %d %v, want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0", "-1MiB", "fast", "0.1B"} {
		if _, err := parseRate(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
