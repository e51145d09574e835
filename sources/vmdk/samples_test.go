package vmdk

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// Every sample qemu reads: our bytes and map equal qemu-img's.
func TestSamplesAgainstQemu(t *testing.T) {
	cases := []struct {
		file  string
		extra []string // other files the sample needs
		sub   string
	}{
		{"monolithicSparse.vmdk", nil, "monolithicSparse"},
		{"twoGbMaxExtentSparse.vmdk", []string{"twoGbMaxExtentSparse-s001.vmdk"}, "twoGbMaxExtentSparse"},
		{"streamOptimized.vmdk", nil, "streamOptimized"},
		{"streamOptimizedWithMarkers.vmdk", nil, "streamOptimized"},
		{"vmfs_thick.vmdk", []string{"vmfs_thick-flat.vmdk"}, "vmfs"},
		{"sesparse.vmdk", []string{"sesparse-extent.vmdk"}, "seSparse"},
		{"iotest-version3.vmdk", nil, "streamOptimized"},
		{"openvmdk-stream-32M.vmdk", nil, "streamOptimized"},
	}
	for _, tc := range cases {
		t.Run(tc.file, func(t *testing.T) {
			dir := t.TempDir()
			for _, f := range tc.extra {
				sample(t, dir, f)
			}
			c := checkOracle(t, sample(t, dir, tc.file), Options{})
			if got := c.Layers()[0].Subformat; got != tc.sub {
				t.Fatalf("subformat %q, want %q", got, tc.sub)
			}
		})
	}
}

// Sample facts checked without qemu.
func TestSampleDetails(t *testing.T) {
	dir := t.TempDir()
	sample(t, dir, "sesparse-extent.vmdk")
	c := mustOpen(t, sample(t, dir, "sesparse.vmdk"), Options{})
	b := make([]byte, 16<<20)
	if _, err := c.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, bytes.Repeat([]byte{'a'}, 16<<20)) {
		t.Fatal("sesparse.vmdk: the first 16 MiB do not read as 'a'")
	}

	// RDONLY extent line, GD in the footer, extent named differently.
	c = mustOpen(t, sample(t, dir, "iotest-version3.vmdk"), Options{})
	if d := c.Descriptor(0); d.Extents[0].Access != RDONLY || c.Layers()[0].Props["sparse_version"] != "3" {
		t.Fatalf("iotest-version3: %+v %v", d.Extents, c.Layers()[0].Props)
	}

	c = mustOpen(t, sample(t, dir, "monolithicSparse.vmdk"), Options{})
	p := c.Info().Props
	if p["uuid"] == "" || p["geometry"] == "" || p["hardware_version"] == "" || p["adapter_type"] == "" {
		t.Fatalf("monolithicSparse props: %v", p)
	}

	// A descriptor whose extent is absent, in windows-1252.
	_, err := openPath(t, sample(t, dir, "player9-descriptor.vmdk"), Options{})
	if err == nil || !strings.Contains(err.Error(), "test1.vmdk") {
		t.Fatalf("player9: err = %v, want one naming test1.vmdk", err)
	}
	d, err := ParseDescriptor(readSample(t, "player9-descriptor.vmdk"))
	if err != nil || d.Encoding != "windows-1252" || d.CID != 0xfffffffe || d.DDB("adapterType") != "ide" || d.Extents[0].Sectors != 16777216 {
		t.Fatalf("player9 descriptor: %+v, %v", d, err)
	}
}

func readSample(t *testing.T, name string) []byte {
	t.Helper()
	dir := t.TempDir()
	b, err := os.ReadFile(sample(t, dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The broken and hostile samples are refused with an error naming the file
// and the field, without a large allocation.
func TestSamplesRefused(t *testing.T) {
	cases := []struct {
		file  string
		extra []string
		want  []string
	}{
		{"vmfs_thick-000001.vmdk", []string{"vmfs_thick.vmdk", "vmfs_thick-flat.vmdk"}, []string{"vmfs_thick-000001-delta.vmdk", "no such file"}},
		{"afl9.vmdk", nil, []string{"afl9.vmdk", "capacity"}},
	}
	for _, tc := range cases {
		t.Run(tc.file, func(t *testing.T) {
			dir := t.TempDir()
			for _, f := range tc.extra {
				sample(t, dir, f)
			}
			_, err := openPath(t, sample(t, dir, tc.file), Options{})
			if err == nil {
				t.Fatal("opened")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// The vmfsSparse sample's descriptor names its parent correctly even
// though its delta is missing: with a COWD delta generated for it, the
// chain reads like qemu reads it.
func TestSampleVMFSSparseWithGeneratedDelta(t *testing.T) {
	dir := t.TempDir()
	sample(t, dir, "vmfs_thick.vmdk")
	sample(t, dir, "vmfs_thick-flat.vmdk")
	top := sample(t, dir, "vmfs_thick-000001.vmdk")
	writeCOWD(t, filepath.Join(dir, "vmfs_thick-000001-delta.vmdk"), 4096, map[uint32]cowdGrain{
		0: pattern(512, 5), 1: pattern(512, 6), 2048: pattern(512, 7),
	})
	c := checkOracle(t, top, Options{})
	if got := block.Sum(mustLayerExtents(t, c, 0), block.Data); got != 3*512 {
		t.Fatalf("delta holds %d data bytes, want %d", got, 3*512)
	}
}

func mustLayerExtents(t *testing.T, c *Chain, layer int) []block.Extent {
	t.Helper()
	e, err := c.LayerExtents(t.Context(), layer, 0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// Chain properties come from the topmost layer that has them: an ESXi
// delta descriptor has no adapter type, its base does.
func TestChainPropsFallBackToParents(t *testing.T) {
	dir := t.TempDir()
	sample(t, dir, "vmfs_thick.vmdk")
	sample(t, dir, "vmfs_thick-flat.vmdk")
	top := sample(t, dir, "vmfs_thick-000001.vmdk")
	writeCOWD(t, filepath.Join(dir, "vmfs_thick-000001-delta.vmdk"), 4096, map[uint32]cowdGrain{0: pattern(512, 5)})
	p := mustOpen(t, top, Options{}).Info().Props
	if p["adapter_type"] != "lsilogic" || p["hardware_version"] != "14" || p["create_type"] != "vmfsSparse" || p["chain_depth"] != "2" {
		t.Fatalf("props %v", p)
	}
}
