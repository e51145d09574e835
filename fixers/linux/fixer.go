package linux

import (
	"context"
	"fmt"
	"path"
	"regexp"
	"slices"
	"strings"

	"github.com/vmdk2kvm/vmdk2kvm/plugins"
)

// Version of the Linux fixer.
const Version = "1.0.0"

// Options the host may pass (pb.PlanRequest.Options).
const (
	OptConsole   = "console"              // e.g. "ttyS0": add console= to kernel command lines
	OptCloudInit = "cloud-init-user-data" // NoCloud user-data to seed
)

// Fixer is the Linux fixer.
type Fixer struct{}

// New returns the Linux fixer.
func New() Fixer { return Fixer{} }

// Describe implements plugins.Fixer.
func (Fixer) Describe() plugins.Description {
	return plugins.Description{
		Name:    "linux",
		Version: Version,
		Summary: "make a VMware Linux guest boot on KVM: stable device names, virtio initramfs, bootloader, network, VMware tools",
		OSTypes: []string{"linux"},
		Order:   10,
	}
}

// plan accumulates changes and reads files once.
type plan struct {
	g       *plugins.Guest
	r       *resolver
	changes []plugins.Change
	// regen: the initramfs must be rebuilt (some change the initramfs embeds).
	regen bool
}

func (p *plan) add(cs ...plugins.Change) {
	if len(cs) > 0 {
		p.regen = true
	}
	p.changes = append(p.changes, cs...)
}

func (p *plan) read(ctx context.Context, file string) ([]byte, error) {
	st, err := p.g.Stat(ctx, file)
	if err != nil || !st.Exists || !st.IsRegular {
		return nil, err
	}
	return p.g.ReadFile(ctx, file)
}

func (p *plan) exists(ctx context.Context, file string) bool {
	ok, _ := p.g.Exists(ctx, file)
	return ok
}

func (p *plan) firstExisting(ctx context.Context, files ...string) string {
	for _, f := range files {
		if p.exists(ctx, f) {
			return f
		}
	}
	return ""
}

func (p *plan) listGlob(ctx context.Context, dir, suffix string) []string {
	names, _ := p.g.List(ctx, dir)
	var out []string
	for _, n := range names {
		if strings.HasSuffix(n, suffix) {
			out = append(out, path.Join(dir, n))
		}
	}
	return out
}

// Plan implements plugins.Fixer.
func (Fixer) Plan(ctx context.Context, g *plugins.Guest) ([]plugins.Change, error) {
	in := g.Inspection()
	if in.OsType != "linux" {
		return nil, nil
	}
	p := &plan{g: g, r: newResolver(in)}
	steps := []func(context.Context) error{p.tabs, p.resumeConf, p.bootloaders, p.network, p.vmwareTools, p.cloudInit}
	for _, s := range steps {
		if err := s(ctx); err != nil {
			return nil, err
		}
	}
	if err := p.initramfs(ctx); err != nil {
		return nil, err
	}
	if err := p.grubRegen(ctx); err != nil {
		return nil, err
	}
	return p.changes, nil
}

func sentence(what string, did []string) string {
	return fmt.Sprintf("%s: %s.", what, strings.Join(did, "; "))
}

// tabs fixes /etc/fstab and /etc/crypttab.
func (p *plan) tabs(ctx context.Context) error {
	for _, t := range []struct {
		file       string
		col, mpCol int
	}{{"/etc/fstab", 0, 1}, {"/etc/crypttab", 1, -1}} {
		old, err := p.read(ctx, t.file)
		if err != nil {
			return err
		}
		if old == nil {
			continue
		}
		nt, did, warn := fixTab(string(old), t.col, t.mpCol, p.r)
		for _, w := range warn {
			p.g.Warn("%s: %s", t.file, w)
		}
		p.add(plugins.EditFile(sentence("Use stable device names in "+t.file, did), t.file, old, []byte(nt), 0)...)
	}
	return nil
}

// resumeConf fixes initramfs-tools' RESUME= (hibernation swap device).
func (p *plan) resumeConf(ctx context.Context) error {
	const f = "/etc/initramfs-tools/conf.d/resume"
	old, err := p.read(ctx, f)
	if err != nil || old == nil {
		return err
	}
	lines := strings.SplitAfter(string(old), "\n")
	var did []string
	for i, l := range lines {
		k, v, ok := strings.Cut(strings.TrimSpace(l), "=")
		if !ok || k != "RESUME" || !unstable(strings.Trim(v, `"`)) {
			continue
		}
		st, err := p.r.stable(strings.Trim(v, `"`), "")
		if err != nil {
			p.g.Warn("%s: %v", f, err)
			continue
		}
		lines[i] = "RESUME=" + st + "\n"
		did = append(did, v+" → "+st)
	}
	p.add(plugins.EditFile(sentence("Use a stable resume device in "+f, did), f, old, []byte(strings.Join(lines, "")), 0)...)
	return nil
}

// bootloaders fixes kernel command lines in every bootloader config present.
func (p *plan) bootloaders(ctx context.Context) error {
	console := p.g.Option(OptConsole)
	edit := func(file string, sel func(string) bool, what string, console string) (bool, error) {
		old, err := p.read(ctx, file)
		if err != nil || old == nil {
			return false, err
		}
		nt, did, warn := fixCmdline(string(old), sel, p.r, console)
		for _, w := range warn {
			p.g.Warn("%s: %s", file, w)
		}
		cs := plugins.EditFile(sentence(what+" "+file, did), file, old, []byte(nt), 0)
		p.add(cs...)
		return len(cs) > 0, nil
	}
	// extlinux / syslinux
	for _, f := range []string{"/boot/extlinux/extlinux.conf", "/boot/extlinux.conf", "/extlinux.conf",
		"/boot/syslinux/syslinux.cfg", "/boot/syslinux.cfg", "/syslinux.cfg", "/syslinux/syslinux.cfg"} {
		if _, err := edit(f, extlinuxLine, "Fix the kernel command line in extlinux/syslinux config", console); err != nil {
			return err
		}
	}
	// GRUB legacy
	for _, f := range []string{"/boot/grub/menu.lst", "/boot/grub/grub.conf"} {
		if _, err := edit(f, func(l string) bool { return strings.HasPrefix(strings.TrimSpace(l), "kernel") }, "Fix the kernel command line in GRUB legacy config", console); err != nil {
			return err
		}
	}
	// BLS / systemd-boot entries and /etc/kernel/cmdline
	for _, dir := range []string{"/boot/loader/entries", "/boot/efi/loader/entries", "/efi/loader/entries"} {
		for _, f := range p.listGlob(ctx, dir, ".conf") {
			if _, err := edit(f, blsLine, "Fix the kernel command line in boot entry", console); err != nil {
				return err
			}
		}
	}
	if _, err := edit("/etc/kernel/cmdline", func(string) bool { return true }, "Fix the kernel command line in", ""); err != nil {
		return err
	}
	// GRUB 2: /etc/default/grub (and grub.d snippets), then grub.cfg
	// regenerated (grubRegen) or edited in place.
	for i, f := range p.grubDefaults(ctx) {
		old, err := p.read(ctx, f)
		if err != nil {
			return err
		}
		if old == nil {
			continue
		}
		nt, did, warn := fixCmdline(string(old), grubDefaultLine, p.r, "")
		for _, w := range warn {
			p.g.Warn("%s: %s", f, w)
		}
		if console != "" && i == 0 {
			nt, did = grubConsole(nt, console, did)
		}
		p.add(plugins.EditFile(sentence("Fix the kernel command line in "+f, did), f, old, []byte(nt), 0)...)
	}
	if p.grubMkconfig(ctx) == "" {
		for _, f := range p.grubCfgs(ctx) {
			if _, err := edit(f, grubCfgLine, "Fix the kernel command lines in", console); err != nil {
				return err
			}
		}
	}
	return nil
}

func (p *plan) grubDefaults(ctx context.Context) []string {
	return append([]string{"/etc/default/grub"}, p.listGlob(ctx, "/etc/default/grub.d", ".cfg")...)
}

var reGrubLinux = regexp.MustCompile(`^(\s*GRUB_CMDLINE_LINUX=)(.*)$`)

func grubConsole(text, console string, did []string) (string, []string) {
	lines := strings.SplitAfter(text, "\n")
	for i, l := range lines {
		if reGrubLinux.MatchString(strings.TrimRight(l, "\n")) && !strings.Contains(l, "console=") {
			lines[i] = addArg(l, "console="+console)
			did = append(did, "add console="+console)
		}
	}
	return strings.Join(lines, ""), did
}

func (p *plan) grubMkconfig(ctx context.Context) string {
	if !p.exists(ctx, "/etc/default/grub") {
		return ""
	}
	for _, f := range []string{"/usr/sbin/grub-mkconfig", "/usr/sbin/grub2-mkconfig", "/sbin/grub-mkconfig", "/sbin/grub2-mkconfig", "/usr/bin/grub-mkconfig"} {
		if p.exists(ctx, f) {
			return f
		}
	}
	return ""
}

func (p *plan) grubCfgs(ctx context.Context) []string {
	var out []string
	for _, f := range []string{"/boot/grub/grub.cfg", "/boot/grub2/grub.cfg"} {
		if p.exists(ctx, f) {
			out = append(out, f)
		}
	}
	efi, _ := p.g.List(ctx, "/boot/efi/EFI")
	for _, d := range efi {
		f := path.Join("/boot/efi/EFI", d, "grub.cfg")
		if p.exists(ctx, f) {
			out = append(out, f)
		}
	}
	return out
}

// grubRegen regenerates grub.cfg with the guest's grub-mkconfig when GRUB's
// inputs changed or the generated file still names unstable devices.
func (p *plan) grubRegen(ctx context.Context) error {
	tool := p.grubMkconfig(ctx)
	if tool == "" {
		return nil
	}
	defaults := p.grubDefaults(ctx)
	changedDefault := slices.ContainsFunc(p.changes, func(c plugins.Change) bool { return slices.Contains(defaults, c.Path) })
	for _, cfg := range p.grubCfgs(ctx) {
		old, err := p.read(ctx, cfg)
		if err != nil {
			return err
		}
		if !strings.Contains(string(old), "linux") { // a stub that loads another grub.cfg
			continue
		}
		_, did, _ := fixCmdline(string(old), grubCfgLine, p.r, "")
		if !changedDefault && len(did) == 0 {
			continue
		}
		p.add(plugins.Change{
			Summary: fmt.Sprintf("Regenerate %s with the guest's %s so the boot entries use the fixed command line.", cfg, path.Base(tool)),
			Command: []string{path.Base(tool), "-o", cfg},
		})
	}
	return nil
}

// initramfs makes the guest's initramfs tool include virtio drivers and
// regenerates the images when anything the initramfs embeds changed.
func (p *plan) initramfs(ctx context.Context) error {
	var regen []string
	switch {
	case p.firstExisting(ctx, "/usr/sbin/update-initramfs", "/sbin/update-initramfs") != "":
		const f = "/etc/initramfs-tools/modules"
		old, err := p.read(ctx, f)
		if err != nil {
			return err
		}
		nt, added := addModuleLines(string(old))
		if len(added) > 0 {
			p.add(plugins.Change{Summary: fmt.Sprintf("Add the virtio drivers %s to the initramfs module list %s.", strings.Join(added, ", "), f),
				Path: f, Old: old, Exists: old != nil, New: []byte(nt), Mode: 0o644})
		}
		regen = []string{"update-initramfs", "-u", "-k", "all"}
	case p.firstExisting(ctx, "/usr/bin/dracut", "/usr/sbin/dracut", "/sbin/dracut") != "":
		const f = "/etc/dracut.conf.d/90-vmdk2kvm-virtio.conf"
		old, err := p.read(ctx, f)
		if err != nil {
			return err
		}
		want := "# virtio drivers for KVM, added by vmdk2kvm\nadd_drivers+=\" " + strings.Join(virtioModules, " ") + " \"\n"
		p.add(plugins.EditFile("Make dracut include the virtio drivers ("+f+").", f, old, []byte(want), 0o644)...)
		regen = []string{"dracut", "-f", "--regenerate-all"}
	case p.firstExisting(ctx, "/sbin/mkinitrd", "/usr/sbin/mkinitrd") != "":
		const f = "/etc/sysconfig/kernel"
		old, err := p.read(ctx, f)
		if err != nil {
			return err
		}
		if old != nil {
			nt, added := addInitrdModules(string(old))
			if len(added) > 0 {
				p.add(plugins.EditFile(fmt.Sprintf("Add %s to INITRD_MODULES in %s.", strings.Join(added, ", "), f), f, old, []byte(nt), 0)...)
			}
		}
		regen = []string{"mkinitrd"}
	default:
		p.g.Warn("no initramfs tool (initramfs-tools, dracut, mkinitrd) found: the initramfs was not rebuilt")
		return nil
	}
	if p.regen {
		p.changes = append(p.changes, plugins.Change{
			Summary: fmt.Sprintf("Regenerate the initramfs with the guest's own tool (%s).", strings.Join(regen, " ")),
			Command: regen,
		})
	}
	return nil
}

var reInitrdModules = regexp.MustCompile(`(?m)^INITRD_MODULES="([^"]*)"`)

func addInitrdModules(text string) (string, []string) {
	m := reInitrdModules.FindStringSubmatchIndex(text)
	if m == nil {
		return text, nil
	}
	have := strings.Fields(text[m[2]:m[3]])
	var add []string
	for _, v := range virtioModules {
		if !slices.Contains(have, v) {
			add = append(add, v)
		}
	}
	if len(add) == 0 {
		return text, nil
	}
	return text[:m[2]] + strings.Join(append(have, add...), " ") + text[m[3]:], add
}

// vmwareTools masks VMware's guest services: they fail or spin on KVM.
func (p *plan) vmwareTools(ctx context.Context) error {
	units := []string{"open-vm-tools.service", "vmtoolsd.service", "vgauth.service", "vgauthd.service",
		"vmware-tools.service", "vmware-tools-thinprint.service", "run-vmblock\\x2dfuse.mount"}
	for _, u := range units {
		found := ""
		for _, d := range []string{"/lib/systemd/system", "/usr/lib/systemd/system", "/etc/systemd/system"} {
			if p.exists(ctx, path.Join(d, u)) {
				found = d
				break
			}
		}
		if found == "" {
			continue
		}
		mask := path.Join("/etc/systemd/system", u)
		st, err := p.g.Stat(ctx, mask)
		if err != nil {
			return err
		}
		if st.Exists && st.IsSymlink {
			if t, _ := p.g.Readlink(ctx, mask); t == "/dev/null" {
				continue
			}
		}
		if st.Exists && !st.IsSymlink {
			p.changes = append(p.changes, plugins.Change{Summary: "Remove the VMware unit " + mask + " before masking it.", Path: mask, Remove: true})
		} else if st.Exists {
			p.changes = append(p.changes, plugins.Change{Summary: "Remove the link " + mask + " before masking it.", Path: mask, Remove: true})
		}
		p.changes = append(p.changes, plugins.Change{
			Summary: fmt.Sprintf("Mask the VMware service %s (no VMware hypervisor on KVM).", u),
			Path:    mask, LinkTarget: "/dev/null",
		})
	}
	// SysV VMware Tools (tarball installs, pre-systemd guests); with systemd the
	// native units above win and the rc links are never used.
	if p.firstExisting(ctx, "/lib/systemd/systemd", "/usr/lib/systemd/systemd") != "" {
		return nil
	}
	for _, rc := range []string{"/etc/rc2.d", "/etc/rc3.d", "/etc/rc4.d", "/etc/rc5.d", "/etc/rc.d/rc3.d", "/etc/rc.d/rc5.d"} {
		names, _ := p.g.List(ctx, rc)
		for _, n := range names {
			if strings.HasPrefix(n, "S") && (strings.Contains(n, "vmware-tools") || strings.Contains(n, "open-vm-tools") || strings.Contains(n, "vmtoolsd")) {
				p.changes = append(p.changes, plugins.Change{Summary: "Stop VMware Tools starting at boot (" + path.Join(rc, n) + ").", Path: path.Join(rc, n), Remove: true})
			}
		}
	}
	return nil
}

// cloudInit writes a NoCloud seed when the host passed user-data.
func (p *plan) cloudInit(ctx context.Context) error {
	ud := p.g.Option(OptCloudInit)
	if ud == "" {
		return nil
	}
	if p.firstExisting(ctx, "/usr/bin/cloud-init", "/bin/cloud-init") == "" {
		p.g.Warn("cloud-init is not installed in the guest: the NoCloud seed is written but nothing reads it until cloud-init is installed")
	}
	dir := "/var/lib/cloud/seed/nocloud"
	for _, f := range []struct{ name, content string }{
		{"user-data", ud},
		{"meta-data", "instance-id: vmdk2kvm-" + p.r.in.Hostname + "\nlocal-hostname: " + p.r.in.Hostname + "\n"},
	} {
		file := path.Join(dir, f.name)
		old, err := p.read(ctx, file)
		if err != nil {
			return err
		}
		p.changes = append(p.changes, plugins.EditFile("Seed cloud-init (NoCloud) "+file+".", file, old, []byte(f.content), 0o600)...)
	}
	return nil
}
