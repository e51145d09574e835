package validate

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestConsoleParsing(t *testing.T) {
	initramfs := "Begin: Running /scripts/local-block ... done.\nGave up waiting for root file system device.  Common problems:\n" +
		" - Boot args (cat /proc/cmdline)\nALERT!  /dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0-part1 does not exist.  Dropping to a shell!\n(initramfs) "
	why := failure(initramfs)
	if !strings.Contains(why, "ALERT!  /dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0-part1 does not exist") || !strings.Contains(why, "Gave up waiting") {
		t.Fatalf("reason %q", why)
	}
	// An ALERT without the shell prompt yet: keep waiting.
	if why := failure("ALERT!  /dev/x does not exist.\n"); why != "" {
		t.Fatalf("judged too early: %q", why)
	}
	if why := failure("[  OK  ] Reached target multi-user.target\n"); why != "" {
		t.Fatalf("healthy console judged failed: %q", why)
	}
	if l, ok := findLine("a\nxx VMDK2KVM-BOOT-OK root=/dev/vda1 nics=ens192 lo \nb", "VMDK2KVM-BOOT-OK"); !ok || l != "xx VMDK2KVM-BOOT-OK root=/dev/vda1 nics=ens192 lo" {
		t.Fatalf("line %q %v", l, ok)
	}
	if _, ok := findLine("VMDK2KVM-BOOT-OK partial", "VMDK2KVM-BOOT-OK"); ok {
		t.Fatal("an unfinished line was taken")
	}
}

// TestBootTimeout boots a blank disk under real qemu: nothing ever reaches the
// console, and the harness gives up at its timeout with a reason.
func TestBootTimeout(t *testing.T) {
	img := filepath.Join(t.TempDir(), "blank.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	console := filepath.Join(t.TempDir(), "console.log")
	r, err := Boot(context.Background(), BootOptions{Image: img, Format: "raw", Marker: "never", Timeout: 8 * time.Second, NIC: "none", Console: console})
	if err != nil {
		t.Fatal(err)
	}
	if r.Reached || !strings.Contains(r.Reason, "no marker within 8s") || r.Elapsed < 8*time.Second {
		t.Fatalf("blank disk: %+v", r)
	}
	if _, err := os.Stat(console); err != nil {
		t.Fatalf("console file: %v", err)
	}
	t.Logf("blank disk: %s after %s", r.Reason, r.Elapsed)
	if _, err := Boot(context.Background(), BootOptions{Image: img, Marker: "x", Bus: "floppy"}); err == nil {
		t.Fatal("unknown bus accepted")
	}
}
