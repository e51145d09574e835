package vmdk

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/internal/diskgen"
)

// baseRaw is a 64 MiB diskgen disk shared by the qemu-img oracle tests.
var baseRaw string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "vmdk-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	baseRaw = filepath.Join(dir, "base.raw")
	if _, err := diskgen.Write(context.Background(), baseRaw, 64<<20, 1); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
