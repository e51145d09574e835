package linux

import (
	"fmt"
	"regexp"
	"strings"
)

// fixTab rewrites the device column (col, 0-based) of an fstab/crypttab-style
// file. mpCol is the mountpoint column (-1: none). It returns the new text and
// sentences describing each replacement, plus warnings for what it could not fix.
func fixTab(text string, col, mpCol int, r *resolver) (string, []string, []string) {
	var did, warn []string
	lines := strings.SplitAfter(text, "\n")
	for i, line := range lines {
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		fields := strings.Fields(trimmed)
		if len(fields) <= col || !unstable(fields[col]) {
			continue
		}
		mp := ""
		if mpCol >= 0 && len(fields) > mpCol {
			mp = fields[mpCol]
		}
		st, err := r.stable(fields[col], mp)
		if err != nil {
			warn = append(warn, err.Error())
			continue
		}
		lines[i] = replaceField(line, col, st)
		did = append(did, fmt.Sprintf("%s → %s", fields[col], st))
	}
	return strings.Join(lines, ""), did, warn
}

// replaceField replaces the n-th whitespace-separated field, keeping spacing.
func replaceField(line string, n int, with string) string {
	idx, field := 0, -1
	for idx < len(line) {
		for idx < len(line) && (line[idx] == ' ' || line[idx] == '\t') {
			idx++
		}
		start := idx
		for idx < len(line) && line[idx] != ' ' && line[idx] != '\t' && line[idx] != '\n' && line[idx] != '\r' {
			idx++
		}
		if start == idx {
			break
		}
		field++
		if field == n {
			return line[:start] + with + line[idx:]
		}
	}
	return line
}

var reCmdlineDev = regexp.MustCompile(`(^|[\s"'])(root|resume)=(\S+?)(["'\s]|$)`)

// fixCmdline rewrites root=/resume= device specs on kernel command lines found
// anywhere in text (only on lines selected by isCmdline), and adds console (e.g.
// "ttyS0") to lines that carry root= when asked.
func fixCmdline(text string, isCmdline func(string) bool, r *resolver, console string) (string, []string, []string) {
	var did, warn []string
	lines := strings.SplitAfter(text, "\n")
	for i, line := range lines {
		if !isCmdline(line) {
			continue
		}
		nl := reCmdlineDev.ReplaceAllStringFunc(line, func(m string) string {
			sm := reCmdlineDev.FindStringSubmatch(m)
			key, val := sm[2], sm[3]
			if !unstable(val) {
				return m
			}
			var st string
			var err error
			if key == "root" {
				st, err = r.stable(val, "/")
				if err != nil {
					st, err = r.rootStable()
				}
			} else {
				st, err = r.stable(val, "")
			}
			if err != nil {
				warn = append(warn, fmt.Sprintf("%s=%s: %v", key, val, err))
				return m
			}
			did = append(did, fmt.Sprintf("%s=%s → %s=%s", key, val, key, st))
			return sm[1] + key + "=" + st + sm[4]
		})
		if console != "" && strings.Contains(nl, "root=") && !strings.Contains(nl, "console="+console) {
			nl = addArg(nl, "console="+console)
			did = append(did, "add console="+console)
		}
		lines[i] = nl
	}
	return strings.Join(lines, ""), did, warn
}

// addArg appends an argument to a command line, inside a closing quote if any.
func addArg(line, arg string) string {
	body := strings.TrimRight(line, "\r\n")
	eol := line[len(body):]
	if strings.HasSuffix(body, `"`) {
		inner := strings.TrimSuffix(body, `"`)
		sep := " "
		if strings.HasSuffix(inner, `"`) || strings.HasSuffix(inner, "=") {
			sep = ""
		}
		return inner + sep + arg + `"` + eol
	}
	return body + " " + arg + eol
}

// Selectors of kernel command line lines per bootloader config format.
func extlinuxLine(l string) bool {
	t := strings.ToLower(strings.TrimSpace(l))
	return strings.HasPrefix(t, "append ")
}

func grubDefaultLine(l string) bool {
	t := strings.TrimSpace(l)
	return strings.HasPrefix(t, "GRUB_CMDLINE_LINUX")
}

func grubCfgLine(l string) bool {
	t := strings.TrimSpace(l)
	return strings.HasPrefix(t, "linux") || strings.HasPrefix(t, "kernel") || strings.HasPrefix(t, "set kernelopts=") || strings.HasPrefix(t, "options ")
}

func blsLine(l string) bool { return strings.HasPrefix(strings.TrimSpace(l), "options ") }

// virtioModules must be in every initramfs.
var virtioModules = []string{"virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net"}

// addModuleLines appends missing modules to a one-module-per-line file
// (initramfs-tools' /etc/initramfs-tools/modules).
func addModuleLines(text string) (string, []string) {
	have := map[string]bool{}
	for _, l := range strings.Split(text, "\n") {
		f := strings.Fields(l)
		if len(f) > 0 && !strings.HasPrefix(f[0], "#") {
			have[f[0]] = true
		}
	}
	var add []string
	for _, m := range virtioModules {
		if !have[m] {
			add = append(add, m)
		}
	}
	if len(add) == 0 {
		return text, nil
	}
	if text != "" && !strings.HasSuffix(text, "\n") {
		text += "\n"
	}
	text += "# virtio drivers for KVM, added by vmdk2kvm\n" + strings.Join(add, "\n") + "\n"
	return text, add
}

// removeMACLines drops lines matching re (MAC pinning) and reports them.
func removeMACLines(text string, re *regexp.Regexp) (string, []string) {
	var out, gone []string
	for _, l := range strings.SplitAfter(text, "\n") {
		if re.MatchString(l) {
			gone = append(gone, strings.TrimSpace(l))
			continue
		}
		out = append(out, l)
	}
	return strings.Join(out, ""), gone
}

var (
	reIfcfgHWADDR = regexp.MustCompile(`^\s*HWADDR\s*=`)
	reNMMac       = regexp.MustCompile(`^\s*mac-address\s*=`)
	reUdevMAC     = regexp.MustCompile(`ATTR\{address\}\s*==`)
)

// fixNetplan removes `match: macaddress:` pinning (and the set-name that needs a
// match) from a netplan YAML file, by indentation. It returns the new text and
// the removed lines.
func fixNetplan(text string) (string, []string) {
	lines := strings.SplitAfter(text, "\n")
	indent := func(l string) int { return len(l) - len(strings.TrimLeft(l, " ")) }
	drop := make([]bool, len(lines))
	var gone []string
	for i, l := range lines {
		if strings.TrimSpace(l) != "match:" {
			continue
		}
		mi := indent(l)
		// children of match:
		var kids []int
		j := i + 1
		for ; j < len(lines); j++ {
			if strings.TrimSpace(lines[j]) == "" {
				continue
			}
			if indent(lines[j]) <= mi {
				break
			}
			kids = append(kids, j)
		}
		macOnly := true
		hasMAC := false
		for _, k := range kids {
			if strings.HasPrefix(strings.TrimSpace(lines[k]), "macaddress:") {
				hasMAC = true
			} else {
				macOnly = false
			}
		}
		if !hasMAC {
			continue
		}
		for _, k := range kids {
			if strings.HasPrefix(strings.TrimSpace(lines[k]), "macaddress:") {
				drop[k] = true
			}
		}
		if macOnly {
			drop[i] = true
			// siblings of match: named set-name go too (netplan requires a match)
			for s := range lines {
				if indent(lines[s]) == mi && strings.HasPrefix(strings.TrimSpace(lines[s]), "set-name:") && sameBlock(lines, s, i, mi) {
					drop[s] = true
				}
			}
		}
	}
	var out []string
	for i, l := range lines {
		if drop[i] {
			gone = append(gone, strings.TrimSpace(l))
			continue
		}
		out = append(out, l)
	}
	return strings.Join(out, ""), gone
}

// sameBlock reports whether lines a and b (both at indent n) belong to the same
// parent mapping: no line with smaller indent lies between them.
func sameBlock(lines []string, a, b, n int) bool {
	if a > b {
		a, b = b, a
	}
	for k := a + 1; k < b; k++ {
		t := strings.TrimSpace(lines[k])
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		if len(lines[k])-len(strings.TrimLeft(lines[k], " ")) < n {
			return false
		}
	}
	return true
}
