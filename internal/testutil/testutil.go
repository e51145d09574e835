// Package testutil holds small helpers shared by the project's tests: finding
// the repository root and the shared samples, running qemu-img as the oracle.
package testutil

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// RepoRoot returns the folder holding go.mod.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test's folder")
		}
		dir = parent
	}
}

// SharedDir returns the project's shared folder (../shared beside the
// checkout, as CI lays it out, or /work/shared).
func SharedDir(t testing.TB) string {
	t.Helper()
	for _, d := range []string{filepath.Join(RepoRoot(t), "..", "shared"), "/work/shared"} {
		if st, err := os.Stat(d); err == nil && st.IsDir() {
			return d
		}
	}
	t.Fatal("shared folder not found beside the checkout")
	return ""
}

// Samples returns the folder of real VMDK samples (shared/samples/vmdk
// beside the checkout, as CI lays it out, or /work/shared/samples/vmdk),
// for callers without a testing.TB.
func Samples() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	cands := []string{}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			cands = append(cands, filepath.Join(filepath.Dir(d), "shared", "samples", "vmdk"))
			break
		}
		if filepath.Dir(d) == d {
			break
		}
	}
	cands = append(cands, "/work/shared/samples/vmdk")
	for _, p := range cands {
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			return p, nil
		}
	}
	return "", fmt.Errorf("VMDK samples not found at %s", strings.Join(cands, " nor "))
}

// SamplesDir is Samples for tests: it fails the test when they are missing.
func SamplesDir(t testing.TB) string {
	t.Helper()
	p, err := Samples()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Run runs a command and fails the test with its output if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// MapEntry is one line of `qemu-img map --output=json`.
type MapEntry struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Data   bool  `json:"data"`
	Zero   bool  `json:"zero"`
}

// QemuMap returns qemu-img's map of an image.
func QemuMap(t testing.TB, format, path string) []MapEntry {
	t.Helper()
	var m []MapEntry
	if err := json.Unmarshal([]byte(Run(t, "qemu-img", "map", "--output=json", "-f", format, path)), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// Compare runs `qemu-img compare` and fails unless the images are identical.
func Compare(t testing.TB, fmtA, a, fmtB, b string) {
	t.Helper()
	Run(t, "qemu-img", "compare", "-f", fmtA, "-F", fmtB, a, b)
}
