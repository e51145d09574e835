package linux

import (
	"context"
	"fmt"
	"path"
	"regexp"
	"sort"
	"strings"

	"github.com/vmdk2kvm/vmdk2kvm/plugins"
)

var (
	reIfupdownName = regexp.MustCompile(`^\s*(?:iface|auto|allow-hotplug|allow-auto)\s+(.+)$`)
	reKeyName      = regexp.MustCompile(`^\s*(?:DEVICE|interface-name|Name)\s*=\s*"?([A-Za-z0-9_.:-]+)"?\s*$`)
	reLinkMAC      = regexp.MustCompile(`(?m)^\s*MACAddress\s*=`)
	reLinkName     = regexp.MustCompile(`(?m)^\s*Name\s*=\s*(\S+)`)
)

// network removes MAC pinning and keeps the configured interface name for the
// virtio NIC.
func (p *plan) network(ctx context.Context) error {
	names := map[string]bool{}
	note := func(n string) {
		n = strings.TrimSpace(n)
		if n != "" && n != "lo" && !strings.ContainsAny(n, "*?") {
			names[n] = true
		}
	}
	// udev persistent-net rules.
	for _, f := range []string{"/etc/udev/rules.d/70-persistent-net.rules", "/etc/udev/rules.d/75-persistent-net-generator.rules"} {
		old, err := p.read(ctx, f)
		if err != nil {
			return err
		}
		if old == nil {
			continue
		}
		nt, gone := removeMACLines(string(old), reUdevMAC)
		if len(gone) == 0 {
			continue
		}
		if onlyComments(nt) {
			p.add(plugins.Change{Summary: fmt.Sprintf("Remove %s: its %d rule(s) pin interface names to VMware MAC addresses.", f, len(gone)), Path: f, Remove: true})
		} else {
			p.add(plugins.EditFile(fmt.Sprintf("Drop %d MAC-pinned rule(s) from %s.", len(gone), f), f, old, []byte(nt), 0)...)
		}
	}
	// systemd .link files that pin a name to a MAC.
	for _, f := range p.listGlob(ctx, "/etc/systemd/network", ".link") {
		old, err := p.read(ctx, f)
		if err != nil {
			return err
		}
		if reLinkMAC.Match(old) && !strings.Contains(string(old), "vmdk2kvm") {
			if m := reLinkName.FindSubmatch(old); m != nil {
				note(string(m[1]))
			}
			p.add(plugins.Change{Summary: "Remove " + f + ": it names an interface by its VMware MAC address.", Path: f, Remove: true})
		}
	}
	// ifupdown
	ifupdown := []string{"/etc/network/interfaces"}
	ifupdown = append(ifupdown, p.listGlob(ctx, "/etc/network/interfaces.d", "")...)
	for _, f := range ifupdown {
		b, err := p.read(ctx, f)
		if err != nil {
			return err
		}
		for _, l := range strings.Split(string(b), "\n") {
			if m := reIfupdownName.FindStringSubmatch(l); m != nil {
				fs := strings.Fields(m[1])
				if strings.HasPrefix(strings.TrimSpace(l), "iface") {
					fs = fs[:1]
				}
				for _, n := range fs {
					note(n)
				}
			}
		}
	}
	// netplan
	for _, f := range p.listGlob(ctx, "/etc/netplan", ".yaml") {
		old, err := p.read(ctx, f)
		if err != nil {
			return err
		}
		for _, n := range netplanNames(string(old)) {
			note(n)
		}
		nt, gone := fixNetplan(string(old))
		p.add(plugins.EditFile(fmt.Sprintf("Remove MAC address matching from %s (%s).", f, strings.Join(gone, "; ")), f, old, []byte(nt), 0)...)
	}
	// NetworkManager keyfiles
	for _, f := range p.listGlob(ctx, "/etc/NetworkManager/system-connections", "") {
		old, err := p.read(ctx, f)
		if err != nil {
			return err
		}
		nameKeys(string(old), note)
		nt, gone := removeMACLines(string(old), reNMMac)
		if len(gone) > 0 {
			p.add(plugins.EditFile(fmt.Sprintf("Remove the MAC address binding from %s (%s).", f, strings.Join(gone, "; ")), f, old, []byte(nt), 0)...)
		}
	}
	// ifcfg (RHEL network-scripts, SUSE wicked)
	for _, dir := range []string{"/etc/sysconfig/network-scripts", "/etc/sysconfig/network"} {
		for _, f := range p.listGlob(ctx, dir, "") {
			if !strings.HasPrefix(path.Base(f), "ifcfg-") || path.Base(f) == "ifcfg-lo" {
				continue
			}
			old, err := p.read(ctx, f)
			if err != nil {
				return err
			}
			nameKeys(string(old), note)
			if dir == "/etc/sysconfig/network" && !strings.Contains(string(old), "DEVICE=") {
				note(strings.TrimPrefix(path.Base(f), "ifcfg-"))
			}
			nt, gone := removeMACLines(string(old), reIfcfgHWADDR)
			if len(gone) > 0 {
				p.add(plugins.EditFile(fmt.Sprintf("Remove the MAC address binding from %s (%s).", f, strings.Join(gone, "; ")), f, old, []byte(nt), 0)...)
			}
		}
	}
	// systemd-networkd: .network files matching by MAC are rewritten to match
	// by name once the (single) interface name is known.
	var macNetworks []string
	for _, f := range p.listGlob(ctx, "/etc/systemd/network", ".network") {
		b, err := p.read(ctx, f)
		if err != nil {
			return err
		}
		nameKeys(string(b), note)
		if reLinkMAC.Match(b) {
			macNetworks = append(macNetworks, f)
		}
	}
	if err := p.keepName(ctx, names); err != nil {
		return err
	}
	for _, f := range macNetworks {
		old, err := p.read(ctx, f)
		if err != nil {
			return err
		}
		if len(names) != 1 {
			p.g.Warn("%s matches an interface by MAC address; it will not apply to the virtio NIC", f)
			continue
		}
		var name string
		for n := range names {
			name = n
		}
		nt, gone := networkdMatchName(string(old), name)
		p.add(plugins.EditFile(fmt.Sprintf("Match %s by name %s instead of its VMware MAC address (%s).", f, name, strings.Join(gone, "; ")), f, old, []byte(nt), 0)...)
	}
	return nil
}

// networkdMatchName replaces MACAddress= in a .network file's [Match] section
// by Name=name (or drops it when the section already matches a name).
func networkdMatchName(text, name string) (string, []string) {
	lines := strings.SplitAfter(text, "\n")
	section, hasName := "", false
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if strings.HasPrefix(t, "[") {
			section = t
		} else if section == "[Match]" && strings.HasPrefix(t, "Name=") {
			hasName = true
		}
	}
	var out, gone []string
	section = ""
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if strings.HasPrefix(t, "[") {
			section = t
		}
		if section == "[Match]" && strings.HasPrefix(t, "MACAddress=") {
			gone = append(gone, t)
			if !hasName {
				out = append(out, "Name="+name+"\n")
				hasName = true
			}
			continue
		}
		out = append(out, l)
	}
	return strings.Join(out, ""), gone
}

func onlyComments(text string) bool {
	for _, l := range strings.Split(text, "\n") {
		if t := strings.TrimSpace(l); t != "" && !strings.HasPrefix(t, "#") {
			return false
		}
	}
	return true
}

func nameKeys(text string, note func(string)) {
	for _, l := range strings.Split(text, "\n") {
		if m := reKeyName.FindStringSubmatch(l); m != nil {
			note(m[1])
		}
	}
}

// netplanNames returns the interface ids under ethernets: (and their set-name).
func netplanNames(text string) []string {
	var out []string
	lines := strings.Split(text, "\n")
	in, base := false, -1
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		ind := len(l) - len(strings.TrimLeft(l, " "))
		if t == "ethernets:" {
			in, base = true, -1
			continue
		}
		if in {
			if base == -1 {
				base = ind
			}
			if ind < base {
				in = false
				continue
			}
			if ind == base && strings.HasSuffix(t, ":") {
				out = append(out, strings.TrimSuffix(t, ":"))
			}
			if strings.HasPrefix(t, "set-name:") {
				out = append(out, strings.Trim(strings.TrimSpace(strings.TrimPrefix(t, "set-name:")), `"'`))
			}
		}
	}
	return out
}

// keepName names the virtio NIC like the single configured VMware NIC, so every
// configuration that names it (addresses, firewall, services) still applies.
func (p *plan) keepName(ctx context.Context, names map[string]bool) error {
	if len(names) == 0 {
		return nil
	}
	list := make([]string, 0, len(names))
	for n := range names {
		list = append(list, n)
	}
	sort.Strings(list)
	if len(list) > 1 {
		p.g.Warn("network configuration names %d interfaces (%s): interface names were not pinned; check them after the first boot", len(list), strings.Join(list, ", "))
		return nil
	}
	if p.firstExisting(ctx, "/lib/systemd/network/99-default.link", "/usr/lib/systemd/network/99-default.link") == "" {
		return nil // no systemd-udevd .link support: kernel names (eth0) apply
	}
	name := list[0]
	f := "/etc/systemd/network/10-vmdk2kvm-" + name + ".link"
	old, err := p.read(ctx, f)
	if err != nil {
		return err
	}
	want := fmt.Sprintf("# Written by vmdk2kvm: on VMware this guest's NIC was %s. Keep that name\n"+
		"# for the virtio NIC so the network configuration that names it applies.\n"+
		"[Match]\nDriver=virtio_net\n\n[Link]\nName=%s\n", name, name)
	p.add(plugins.EditFile(fmt.Sprintf("Name the virtio NIC %s, as the VMware NIC was, so its configuration applies (%s).", name, f), f, old, []byte(want), 0o644)...)
	return nil
}
