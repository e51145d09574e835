package cbt

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

func ext(off, n int64) block.Extent { return block.Extent{Off: off, Len: n, Type: block.Data} }

func TestNormalizeAlign(t *testing.T) {
	got := Normalize([]block.Extent{ext(100, 10), ext(0, 50), ext(40, 20), ext(110, 5), ext(990, 100)}, 1000)
	want := []block.Extent{ext(0, 60), ext(100, 15), ext(990, 10)}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Normalize = %v", got)
	}
	if got := Align([]block.Extent{ext(5, 10), ext(4096, 1)}, 4096, 1<<20); !reflect.DeepEqual(got, []block.Extent{ext(0, 8192)}) {
		t.Fatalf("Align = %v", got)
	}
}

func TestChangeIDEpoch(t *testing.T) {
	if e := ChangeIDEpoch("52 de 11-22 33/4711"); e != "52 de 11-22 33" {
		t.Fatal(e)
	}
}

func TestRestrict(t *testing.T) {
	m := block.NewMemory(1<<20, 4096)
	m.WriteAt(make([]byte, 8192), 0)
	m.WriteAt([]byte{1}, 512<<10)
	r := Restrict(m, []block.Extent{ext(4096, 4096), ext(500<<10, 100<<10)})
	exts, err := r.Extents(context.Background(), 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if err := block.Check(exts, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if d := block.Sum(exts, block.Data); d != 4096+4096 {
		t.Fatalf("data %d in %v", d, exts)
	}
	if exts[0].Type != block.Hole || exts[0].Len != 4096 {
		t.Fatalf("first %v", exts[0])
	}
}

// Pages of a fake server: an empty page mid-disk is not the end; a server
// that makes no progress is an error, not a loop.
func TestVSpherePaging(t *testing.T) {
	const size = 10 << 20
	pages := map[int64]Page{
		0:       {Start: 0, Length: 2 << 20, Areas: []block.Extent{ext(0, 4096), ext(1<<20, 4096)}},
		2 << 20: {Start: 2 << 20, Length: 4 << 20}, // empty
		6 << 20: {Start: 6 << 20, Length: 4 << 20, Areas: []block.Extent{ext(9<<20, 1<<20)}},
	}
	var asked []string
	v := &VSphere{Capacity: size, ChangeID: "aa/2", Query: func(_ context.Context, off int64, id string) (Page, error) {
		asked = append(asked, id)
		return pages[off], nil
	}}
	r, err := v.Changed(context.Background(), "aa/1")
	if err != nil {
		t.Fatal(err)
	}
	if r.Full || r.Token != "aa/2" || !reflect.DeepEqual(r.Extents, []block.Extent{ext(0, 4096), ext(1<<20, 4096), ext(9<<20, 1<<20)}) {
		t.Fatalf("%+v", r)
	}
	if len(asked) != 3 || asked[0] != "aa/1" {
		t.Fatalf("asked %v", asked)
	}
	asked = nil
	if r, err = v.Changed(context.Background(), ""); err != nil || !r.Full || asked[0] != AllAllocated {
		t.Fatalf("baseline: %+v %v %v", r, err, asked)
	}
	if r, err = v.Changed(context.Background(), "bb/7"); err != nil || !r.Full || r.Warning == "" {
		t.Fatalf("reset: %+v %v", r, err)
	}
	stuck := &VSphere{Capacity: size, ChangeID: "aa/2", Query: func(context.Context, int64, string) (Page, error) {
		return Page{Start: 0, Length: 0}, nil
	}}
	if _, err := stuck.Changed(context.Background(), "aa/1"); err == nil || !strings.Contains(err.Error(), "no progress") {
		t.Fatalf("stuck server: %v", err)
	}
	outside := &VSphere{Capacity: size, ChangeID: "aa/2", Query: func(context.Context, int64, string) (Page, error) {
		return Page{Start: 0, Length: size / 2, Areas: []block.Extent{ext(size-4096, 4096)}}, nil
	}}
	if _, err := outside.Changed(context.Background(), "aa/1"); err == nil {
		t.Fatal("area outside its page accepted")
	}
	off := &VSphere{Capacity: size}
	if _, err := off.Changed(context.Background(), ""); err == nil {
		t.Fatal("no change ID accepted")
	}
}

// A server refusing the stored change ID with a FileFault (what vSphere says
// after CBT was reset behind the same epoch) → full resync with a warning;
// any other fault is an error.
func TestVSphereRefusedChangeID(t *testing.T) {
	fault := func(f types.BaseMethodFault) error {
		return fmt.Errorf("wrapped: %w", soap.WrapSoapFault(&soap.Fault{Detail: struct {
			Fault types.AnyType `xml:",any,typeattr"`
		}{Fault: f}}))
	}
	for _, tc := range []struct {
		f    types.BaseMethodFault
		full bool
	}{{&types.FileFault{}, true}, {&types.NotAuthenticated{}, false}} {
		v := &VSphere{Capacity: 1 << 20, ChangeID: "aa/3", Query: func(_ context.Context, off int64, id string) (Page, error) {
			if id != AllAllocated {
				return Page{}, fault(tc.f)
			}
			return Page{Start: off, Length: 1<<20 - off, Areas: []block.Extent{ext(0, 4096)}}, nil
		}}
		r, err := v.Changed(context.Background(), "aa/2")
		if tc.full && (err != nil || !r.Full || r.Warning == "") {
			t.Fatalf("%T: %+v %v", tc.f, r, err)
		}
		if !tc.full && err == nil {
			t.Fatalf("%T accepted as a refused change ID", tc.f)
		}
	}
}

func TestHashManifest(t *testing.T) {
	ctx := context.Background()
	const bs = 64 << 10
	src := block.NewMemory(1<<20, 4096)
	p := make([]byte, 200<<10)
	for i := range p {
		p[i] = byte(i)
	}
	src.WriteAt(p, 100<<10)
	man := filepath.Join(t.TempDir(), "manifest")
	h := &Hash{Source: src, Manifest: man, BlockSize: bs}
	r, err := h.Changed(ctx, "")
	if err != nil || !r.Full || r.Bytes() != 200<<10 {
		t.Fatalf("first: %+v %v", r, err)
	}
	if err := h.Commit(); err != nil {
		t.Fatal(err)
	}
	// The replica now equals src. Change two blocks.
	replica := block.NewMemory(1<<20, 4096)
	replica.WriteAt(p, 100<<10)
	src.WriteAt([]byte{9}, 5)
	src.WriteAt([]byte{9}, 700<<10)
	h = &Hash{Source: src, Replica: replica, Manifest: man, BlockSize: bs}
	r, err = h.Changed(ctx, r.Token)
	if err != nil || r.Full || !reflect.DeepEqual(r.Extents, []block.Extent{ext(0, bs), ext(640<<10, bs)}) {
		t.Fatalf("second: %+v %v", r, err)
	}
	// A crash after Prepare: the manifest is gone, rebuilt from the replica.
	if err := h.Prepare(); err != nil {
		t.Fatal(err)
	}
	h = &Hash{Source: src, Replica: replica, Manifest: man, BlockSize: bs}
	r, err = h.Changed(ctx, "x")
	if err != nil || r.Full || r.Warning == "" || len(r.Extents) != 2 {
		t.Fatalf("rebuilt: %+v %v", r, err)
	}
}

func TestStateAtomic(t *testing.T) {
	p := filepath.Join(t.TempDir(), StateFile)
	if _, err := LoadState(p); !errors.Is(err, errNotExist()) {
		t.Fatalf("missing state: %v", err)
	}
	s := &State{Source: "vsphere://vc/DC/vm/x"}
	s.PutDisk(Disk{Key: "2000", Replica: "disk-2000.qcow2", Capacity: 1 << 30, Token: "aa/1"})
	s.PutDisk(Disk{Key: "2000", Replica: "disk-2000.qcow2", Capacity: 1 << 30, Token: "aa/2"})
	if err := s.Save(p); err != nil {
		t.Fatal(err)
	}
	got, err := LoadState(p)
	if err != nil || len(got.Disks) != 1 || got.Disk("2000").Token != "aa/2" {
		t.Fatalf("%+v %v", got, err)
	}
	if m, _ := filepath.Glob(filepath.Join(filepath.Dir(p), ".*tmp*")); len(m) != 0 {
		t.Fatalf("temporary files left: %v", m)
	}
	if err := WriteFileAtomic(p, []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadState(p); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("corrupt state: %v", err)
	}
}

func errNotExist() error { return fs.ErrNotExist }
