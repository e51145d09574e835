package vmdk

import (
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/internal/testutil"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
)

func samplesDir(t testing.TB) string { return testutil.SamplesDir(t) }

// sample copies (and decompresses) a sample file into dir under its plain
// name, and returns that path.
func sample(t testing.TB, dir, name string) string {
	t.Helper()
	src := samplesDir(t)
	for _, ext := range []string{"", ".gz", ".bz2"} {
		in, err := os.Open(filepath.Join(src, name+ext))
		if err != nil {
			continue
		}
		defer in.Close()
		var r io.Reader = in
		switch ext {
		case ".gz":
			zr, err := gzip.NewReader(in)
			if err != nil {
				t.Fatal(err)
			}
			r = zr
		case ".bz2":
			r = bzip2.NewReader(in)
		}
		out := filepath.Join(dir, name)
		b, err := io.ReadAll(r)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := os.WriteFile(out, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return out
	}
	t.Fatalf("sample %s not found in %s", name, src)
	return ""
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// openPath opens a VMDK with the local transport, as the CLI does.
func openPath(t testing.TB, p string, opts Options) (*Chain, error) {
	t.Helper()
	fsys, name, err := file.Transport{}.Locate(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	return Open(context.Background(), fsys, name, nil, opts)
}

func mustOpen(t testing.TB, p string, opts Options) *Chain {
	t.Helper()
	c, err := openPath(t, p, opts)
	if err != nil {
		t.Fatalf("open %s: %v", p, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// qemuRaw converts an image to raw with qemu-img and returns the path.
func qemuRaw(t testing.TB, img string) string {
	t.Helper()
	out := img + ".qemu.raw"
	run(t, "qemu-img", "convert", "-O", "raw", img, out)
	return out
}

// allExtents returns the device's whole map, checked for exact coverage.
func allExtents(t testing.TB, d block.Device) []block.Extent {
	t.Helper()
	var out []block.Extent
	err := block.Walk(context.Background(), d, 0, d.Size(), 64<<20, func(e block.Extent) error {
		out = block.Append(out, e)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := block.Check(out, 0, d.Size()); err != nil {
		t.Fatal(err)
	}
	return out
}

// sameBytes holds the device against a raw file: every Data extent and every
// range the raw file holds data in is read from both (in parallel, in 1 MiB
// pieces, as the copier reads) and compared; ranges our map says read as
// zeros must read as zeros from the raw file too.
func sameBytes(t testing.TB, d block.Device, rawPath string) {
	t.Helper()
	rf, err := file.Open(rawPath)
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Close()
	if rf.Size() != d.Size() {
		t.Fatalf("size %d, qemu says %d", d.Size(), rf.Size())
	}
	ctx := context.Background()
	ours := allExtents(t, d)
	theirs, err := rf.Extents(ctx, 0, rf.Size())
	if err != nil {
		t.Fatal(err)
	}
	// Ranges to compare: our data, plus the raw file's data.
	var ranges []block.Extent
	for _, e := range append(block.Clip(ours, 0, d.Size()), theirs...) {
		if e.Type == block.Data {
			ranges = append(ranges, e)
		}
	}
	var g errgroup.Group
	g.SetLimit(4)
	for _, r := range ranges {
		for off := r.Off; off < r.End(); off += 1 << 20 {
			n := min(1<<20, r.End()-off)
			g.Go(func() error {
				a, b := make([]byte, n), make([]byte, n)
				if _, err := d.ReadAt(a, off); err != nil && !(errors.Is(err, io.EOF) && off+n == d.Size()) {
					return fmt.Errorf("ReadAt(%d, +%d): %w", off, n, err)
				}
				if _, err := rf.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
					return err
				}
				if !bytes.Equal(a, b) {
					i := 0
					for a[i] == b[i] {
						i++
					}
					return fmt.Errorf("bytes differ at offset %d: ours %#x, qemu %#x", off+int64(i), a[i], b[i])
				}
				return nil
			})
		}
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
}

// qemuMap returns qemu-img map's data ranges of an image, merged.
func qemuMap(t testing.TB, img string) []block.Extent {
	t.Helper()
	var ents []struct {
		Start, Length int64
		Data          bool
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "map", "--output=json", img)), &ents); err != nil {
		t.Fatal(err)
	}
	var out []block.Extent
	for _, e := range ents {
		typ := block.Hole
		if e.Data {
			typ = block.Data
		}
		out = block.Append(out, block.Extent{Off: e.Start, Len: e.Length, Type: typ})
	}
	return out
}

// dataOnly reduces a map to Data vs not (Hole), merged.
func dataOnly(exts []block.Extent) []block.Extent {
	var out []block.Extent
	for _, e := range exts {
		if e.Type != block.Data {
			e.Type = block.Hole
		}
		out = block.Append(out, e)
	}
	return out
}

// sameMap checks that our map and qemu-img map agree on data vs not.
//
// qemu 7.2 reports FLAT/VMFS extents as data throughout, without asking the
// file for its holes; we report a thin flat file's holes. For images with
// flat extents the check is therefore that our data lies inside qemu's
// (sameBytes proves that the rest reads as zeros).
func sameMap(t testing.TB, d block.Device, img string) {
	t.Helper()
	ours, theirs := dataOnly(allExtents(t, d)), qemuMap(t, img)
	if c, ok := d.(*Chain); ok && c.hasFlat() {
		for _, e := range ours {
			if e.Type != block.Data {
				continue
			}
			for _, q := range block.Clip(theirs, e.Off, e.Len) {
				if q.Type != block.Data {
					t.Fatalf("we map [%d,+%d) as data, qemu-img map has no data at [%d,+%d)", e.Off, e.Len, q.Off, q.Len)
				}
			}
		}
		return
	}
	if fmt.Sprint(ours) != fmt.Sprint(theirs) {
		t.Fatalf("map differs from qemu-img map:\n ours: %v\nqemu: %v", short(ours), short(theirs))
	}
}

func short(e []block.Extent) string {
	s := fmt.Sprint(e)
	if len(s) > 600 {
		s = s[:600] + "..."
	}
	return s
}

// checkOracle is the full qemu-img oracle for an image: bytes and map.
func checkOracle(t testing.TB, img string, opts Options) *Chain {
	t.Helper()
	c := mustOpen(t, img, opts)
	sameBytes(t, c, qemuRaw(t, img))
	sameMap(t, c, img)
	return c
}

// memFS is an in-memory sources.FS (for fuzzing and hand-built files).
type memFS map[string][]byte

func (m memFS) Describe(name string) string { return "mem:" + name }

func (m memFS) Open(_ context.Context, name string) (sources.File, error) {
	b, ok := m[name]
	if !ok {
		return nil, fmt.Errorf("mem:%s: %w", name, os.ErrNotExist)
	}
	return memFile{bytes.NewReader(b)}, nil
}

type memFile struct{ *bytes.Reader }

func (f memFile) Close() error { return nil }

// fixtures is a folder of files built once per test binary.
type fixtures struct {
	dir  string
	once map[string]*sync.Once
	mu   sync.Mutex
}

func (f *fixtures) get(name string, build func(dir string)) string {
	f.mu.Lock()
	o, ok := f.once[name]
	if !ok {
		o = new(sync.Once)
		f.once[name] = o
	}
	f.mu.Unlock()
	o.Do(func() { build(f.dir) })
	return filepath.Join(f.dir, name)
}

func (c *Chain) hasFlat() bool {
	for _, l := range c.layers {
		for _, p := range l.exts {
			if _, ok := p.e.(*flatExtent); ok {
				return true
			}
		}
	}
	return false
}
