package vmdk

import (
	"path/filepath"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/copier"
)

// discard is a copy target that drops everything: the benchmarks measure
// the reader alone. (bench/vmdk.sh measures a whole 4 GiB conversion.)
type discard struct{}

func (discard) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }
func (discard) Zero(_, _ int64) error                  { return nil }
func (discard) Flush() error                           { return nil }

func benchmarkCopy(b *testing.B, sub string) {
	img := filepath.Join(b.TempDir(), "disk.vmdk")
	run(b, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat="+sub, baseRaw, img)
	b.SetBytes(64 << 20)
	for range b.N {
		c, err := openPath(b, img, Options{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := copier.Copy(b.Context(), c, discard{}, copier.Options{TargetZeroed: true}); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

func BenchmarkCopyMonolithicSparse(b *testing.B) { benchmarkCopy(b, "monolithicSparse") }
func BenchmarkCopyStreamOptimized(b *testing.B)  { benchmarkCopy(b, "streamOptimized") }
