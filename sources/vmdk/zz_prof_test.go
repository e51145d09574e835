package vmdk

import (
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/copier"
)

type discard struct{}

func (discard) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
func (discard) Zero(off, n int64) error                  { return nil }
func (discard) Flush() error                             { return nil }

func BenchmarkProfStream(b *testing.B) {
	for range b.N {
		c := mustOpen(b, "/tmp/b1g-streamOptimized.vmdk", Options{})
		if _, err := copier.Copy(b.Context(), c, discard{}, copier.Options{TargetZeroed: true}); err != nil {
			b.Fatal(err)
		}
	}
}
