package pipeline

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// Failures found before the guest is touched: a report, a FixError, and no
// guest helper started (none is installed at the path given).
func TestFixRefusesBeforeTouchingTheGuest(t *testing.T) {
	dev := block.NewMemory(1<<20, 4096)
	cases := []struct {
		name string
		o    FixOptions
		want string
	}{
		{"no plugins", FixOptions{PluginDirs: []string{t.TempDir()}, NoDefaultDirs: true}, "no fixer plugins (vmdk2kvm-fixer-*) found"},
		{"pinned but absent", FixOptions{PluginDirs: []string{t.TempDir()}, NoDefaultDirs: true,
			PluginSHA256: map[string]string{"linux": strings.Repeat("0", 64)}}, "plugin linux is pinned by --plugin-sha256 but was not found"},
		{"bad policy", FixOptions{OnError: "retry"}, "--on-fixer-error: want abort or continue"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.o.Helper = "/nonexistent/vmdk2kvm-guest"
			c.o.DryRun = true
			rep, err := FixDevice(context.Background(), dev, "mem", c.o)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err %v, want %q", err, c.want)
			}
			var fe *FixError
			if c.name != "bad policy" && (!errors.As(err, &fe) || rep == nil || rep.Error == "" || !strings.Contains(rep.Markdown(), "**FAILED:**")) {
				t.Fatalf("no failure report: %v %+v", err, rep)
			}
		})
	}
}
