package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCommitAndAbort(t *testing.T) {
	dir := t.TempDir()
	final := filepath.Join(dir, "out.img")
	f, err := Create(final)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("hello")
	if _, err := os.Stat(final); !os.IsNotExist(err) {
		t.Fatal("final name exists before Commit")
	}
	if err := f.Commit(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(final); string(b) != "hello" {
		t.Fatalf("final holds %q", b)
	}
	if err := f.Commit(); err == nil {
		t.Fatal("second Commit accepted")
	}
	g, err := Create(filepath.Join(dir, "other.img"))
	if err != nil {
		t.Fatal(err)
	}
	g.WriteString("x")
	if err := g.Abort(); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("folder holds %d entries after Abort, want 1", len(ents))
	}
	if _, err := Create(dir); err == nil {
		t.Fatal("a folder accepted as output")
	}
}

func TestNoSyncStillRenames(t *testing.T) {
	final := filepath.Join(t.TempDir(), "fast.img")
	f, err := Create(final)
	if err != nil {
		t.Fatal(err)
	}
	f.NoSync = true
	f.WriteString("quick")
	if err := f.Commit(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(final); string(b) != "quick" {
		t.Fatalf("final holds %q", b)
	}
}
