package atomicfile

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestCommitAndAbort(t *testing.T) {
	dir := t.TempDir()
	final := filepath.Join(dir, "out.img")
	f, err := Create(final, false)
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
	g, err := Create(filepath.Join(dir, "other.img"), false)
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
	if _, err := Create(dir, false); err == nil {
		t.Fatal("a folder accepted as output")
	}
}

func TestNoSyncStillRenames(t *testing.T) {
	final := filepath.Join(t.TempDir(), "fast.img")
	f, err := Create(final, true)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("quick")
	if err := f.Commit(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(final); string(b) != "quick" {
		t.Fatalf("final holds %q", b)
	}
}

// A synced output is handed to the disk in the background while it is
// written; what lands under the final name is still exactly what was
// written, and Abort with the writeback running leaves nothing.
func TestBackgroundWriteback(t *testing.T) {
	dir := t.TempDir()
	want := make([]byte, 8<<20)
	for i := range want {
		want[i] = byte(i * 13)
	}
	for _, commit := range []bool{true, false} {
		f, err := Create(filepath.Join(dir, "bg.img"), false)
		if err != nil {
			t.Fatal(err)
		}
		for off := 0; off < len(want); off += 1 << 20 {
			if _, err := f.WriteAt(want[off:off+1<<20], int64(off)); err != nil {
				t.Fatal(err)
			}
			time.Sleep(WritebackInterval / 2)
		}
		if !commit {
			if err := f.Abort(); err != nil {
				t.Fatal(err)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 1 {
				t.Fatalf("folder holds %d entries after Abort, want 1 (the committed image)", len(ents))
			}
			continue
		}
		if err := f.Commit(); err != nil {
			t.Fatal(err)
		}
		if got, _ := os.ReadFile(filepath.Join(dir, "bg.img")); !bytes.Equal(got, want) {
			t.Fatal("committed file differs from what was written")
		}
	}
}
