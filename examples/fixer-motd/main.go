// Command fixer-motd is an example third-party vmdk2kvm fixer: it leaves a
// migration notice naming the host (read through Augeas) in /etc/motd and a
// udev rule that sets the I/O scheduler of virtio disks to "none". Build it as vmdk2kvm-fixer-motd and put it in a
// plugin directory:
//
//	go build -o ~/.local/lib/vmdk2kvm/plugins/vmdk2kvm-fixer-motd ./examples/fixer-motd
//
// It is idempotent: once applied, its plan is empty.
package main

import (
	"context"

	"github.com/vmdk2kvm/vmdk2kvm/plugins"
)

type motd struct{}

func (motd) Describe() plugins.Description {
	return plugins.Description{
		Name: "motd", Version: "1.0.0", Summary: "migration notice and virtio disk udev rule",
		OSTypes: []string{"linux"}, Order: 50, After: []string{"linux"},
	}
}

const (
	rule = "# Added by the vmdk2kvm example fixer.\n" +
		`ACTION=="add|change", KERNEL=="vd[a-z]", ATTR{queue/scheduler}="none"` + "\n"
)

func (motd) Plan(ctx context.Context, g *plugins.Guest) ([]plugins.Change, error) {
	host, ok, err := g.AugGet(ctx, "/files/etc/hostname/hostname")
	if err != nil {
		return nil, err
	}
	if !ok {
		host = "this system"
	}
	notice := host + " was migrated from VMware to KVM by vmdk2kvm.\n"
	var changes []plugins.Change
	for _, f := range []struct{ path, want, why string }{
		{"/etc/motd", notice, "Write a migration notice to /etc/motd."},
		{"/etc/udev/rules.d/60-vmdk2kvm-scheduler.rules", rule, "Use the none I/O scheduler on virtio disks."},
	} {
		old, err := g.ReadFileIfExists(ctx, f.path)
		if err != nil {
			return nil, err
		}
		changes = append(changes, plugins.EditFile(f.why, f.path, old, []byte(f.want), 0o644)...)
	}
	return changes, nil
}

func main() { plugins.Serve(motd{}) }
