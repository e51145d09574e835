package qcow2

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/copier"
	"github.com/vmdk2kvm/vmdk2kvm/internal/diskgen"
	"github.com/vmdk2kvm/vmdk2kvm/sinks"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
	"github.com/vmdk2kvm/vmdk2kvm/sources/vmdk"
)

// fixtures shared by the package's tests (made once in TestMain).
var fixtureDir string

const diskSize = 24 << 20 // the generated test disk: realistic mix, small

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "qcow2test-")
	if err != nil {
		panic(err)
	}
	fixtureDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// genDisk returns the shared generated raw disk.
func genDisk(t testing.TB) string {
	t.Helper()
	p := filepath.Join(fixtureDir, "disk.raw")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	tmp := p + ".tmp"
	if _, err := diskgen.Write(context.Background(), tmp, diskSize, 7); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, p); err != nil {
		t.Fatal(err)
	}
	return p
}

// run runs a command under a timeout and returns its stdout.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := tryRun(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func tryRun(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var buf bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &buf, &buf
	err := cmd.Run()
	return buf.String(), err
}

type checkResult struct {
	CheckErrors int   `json:"check-errors"`
	Corruptions int   `json:"corruptions"`
	Leaks       int   `json:"leaks"`
	Fragmented  int64 `json:"fragmented-clusters"`
	Compressed  int64 `json:"compressed-clusters"`
	Allocated   int64 `json:"allocated-clusters"`
}

// qemuCheck asserts that qemu-img check finds nothing wrong.
func qemuCheck(t testing.TB, path string) checkResult {
	t.Helper()
	out, err := tryRun("qemu-img", "check", "--output=json", path)
	var r checkResult
	if jerr := json.Unmarshal([]byte(out), &r); jerr != nil || err != nil {
		text, _ := tryRun("qemu-img", "check", path)
		t.Fatalf("qemu-img check %s: %v\n%s", path, err, text)
	}
	if r.CheckErrors != 0 || r.Corruptions != 0 || r.Leaks != 0 {
		text, _ := tryRun("qemu-img", "check", path)
		t.Fatalf("qemu-img check %s: %+v\n%s", path, r, text)
	}
	return r
}

type imgInfo struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	ClusterSize int64  `json:"cluster-size"`
	BackingFile string `json:"backing-filename"`
	Specific    struct {
		Data struct {
			Compat          string `json:"compat"`
			CompressionType string `json:"compression-type"`
		} `json:"data"`
	} `json:"format-specific"`
}

func qemuInfo(t testing.TB, path string) imgInfo {
	t.Helper()
	var info imgInfo
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "--output=json", path)), &info); err != nil {
		t.Fatal(err)
	}
	return info
}

// qemuCompare asserts qemu-img compare finds a and b identical.
func qemuCompare(t testing.TB, a, b string) {
	t.Helper()
	if out, err := tryRun("qemu-img", "compare", a, b); err != nil {
		t.Fatalf("qemu-img compare %s %s: %v\n%s", a, b, err, out)
	}
}

// qemuRaw returns what qemu reads from an image.
func qemuRaw(t testing.TB, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "qemu.raw")
	run(t, "qemu-img", "convert", "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// registry is what the CLI registers, for tests of the source side.
func registry() *sources.Registry {
	r := sources.NewRegistry()
	r.AddTransport(file.Transport{})
	r.AddFormat(vmdk.Format{})
	r.AddFormat(Format{Backing: r.OpenIn})
	r.AddFormat(raw.Format{})
	return r
}

// convert copies a source (opened through the registry) into a new qcow2
// with our writer, the way `vmdk2kvm convert` does.
func convert(t testing.TB, src, dst string, opts sinks.Options) {
	t.Helper()
	img, err := registry().Open(context.Background(), src, sources.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	out, err := Create(dst, img.Size(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := copier.Copy(context.Background(), img, out, copier.Options{TargetZeroed: true}); err != nil {
		out.Abort()
		t.Fatal(err)
	}
	if err := out.Commit(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// readAll reads a whole device.
func readAll(t testing.TB, d block.Device) []byte {
	t.Helper()
	b := make([]byte, d.Size())
	if n, err := d.ReadAt(b, 0); n != len(b) {
		t.Fatalf("read %d of %d bytes: %v", n, len(b), err)
	}
	return b
}

// firstDiff describes where two byte slices differ.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// checkExtents asserts that a device's extents are exact and agree with
// qemu-img map: qemu's data ranges are our Data, the rest reads zeros.
func checkExtents(t testing.TB, d block.Device, content []byte, path string) {
	t.Helper()
	exts, err := d.Extents(context.Background(), 0, d.Size())
	if err != nil {
		t.Fatal(err)
	}
	if err := block.Check(exts, 0, d.Size()); err != nil {
		t.Fatal(err)
	}
	for _, e := range exts {
		if e.Type.ReadsZero() && !block.IsZero(content[e.Off:e.End()]) {
			t.Fatalf("%s: extent %+v (%s) is not zero", path, e, e.Type)
		}
	}
	var m []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "map", "--output=json", path)), &m); err != nil {
		t.Fatal(err)
	}
	for _, q := range m {
		for _, e := range block.Clip(exts, q.Start, q.Length) {
			if (e.Type == block.Data) != q.Data {
				t.Fatalf("%s: [%d,+%d) is %s here but data=%v for qemu-img map", path, e.Off, e.Len, e.Type, q.Data)
			}
		}
	}
}
