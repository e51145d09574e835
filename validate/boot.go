// Package validate checks conversion results. boot*.go is the boot test: it
// starts the converted disk under qemu (TCG unless KVM is asked for), with the
// disk on virtio-blk and the serial console in a file, and waits for a marker
// line or a known failure, always under a timeout.
package validate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// BootOptions describe one boot test.
type BootOptions struct {
	Image  string // disk image; never written (qemu snapshot=on)
	Format string // qcow2, raw...; "" → qcow2
	// Marker is the console text that proves the boot (e.g. a line printed by
	// a unit after multi-user.target, or "login:").
	Marker string
	// Timeout bounds the whole boot (default 5 minutes).
	Timeout time.Duration
	// Console is where the serial console is written (default: a temp file, removed).
	Console string
	// MemoryMiB (default 1024), CPUs (default 1: faster under TCG).
	MemoryMiB, CPUs int
	// Disk bus: "virtio" (default), "scsi" (virtio-scsi), "ide".
	Bus string
	// NIC: "virtio" (default, user networking), "none".
	NIC string
	// UEFI boots with OVMF (the path in OVMFCode, default the Debian one).
	UEFI     bool
	OVMFCode string
	// KVM uses -accel kvm (default TCG: see TEST-PEERS.md).
	KVM bool
	// QEMU is the emulator binary (default qemu-system-x86_64).
	QEMU string
}

// BootResult is what the boot showed.
type BootResult struct {
	Reached bool          // the marker appeared
	Line    string        // the console line holding the marker
	Reason  string        // why the boot failed (console excerpt) when !Reached
	Elapsed time.Duration // until marker, failure or timeout
	Console string        // the whole console log
}

// failurePatterns end a boot early: the guest will not get further.
var failurePatterns = []*regexp.Regexp{
	regexp.MustCompile(`ALERT!.*`),
	regexp.MustCompile(`Kernel panic.*`),
	regexp.MustCompile(`Gave up waiting for root.*`),
	regexp.MustCompile(`\(initramfs\) ?$`),
	regexp.MustCompile(`dracut-initqueue.*timeout.*`),
	regexp.MustCompile(`You are in emergency mode.*`),
	regexp.MustCompile(`No bootable device.*`),
	regexp.MustCompile(`Boot failed: .*`),
}

// Boot starts the image and waits for the marker, a failure, or the timeout.
// The returned error is for harness problems (qemu missing, bad options); a
// guest that does not boot is a BootResult with Reached false.
func Boot(ctx context.Context, o BootOptions) (*BootResult, error) {
	if o.Marker == "" {
		return nil, errors.New("boot: no marker to wait for")
	}
	if o.Format == "" {
		o.Format = "qcow2"
	}
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Minute
	}
	if o.MemoryMiB <= 0 {
		o.MemoryMiB = 1024
	}
	if o.CPUs <= 0 {
		o.CPUs = 1
	}
	if o.QEMU == "" {
		o.QEMU = "qemu-system-x86_64"
	}
	if _, err := os.Stat(o.Image); err != nil {
		return nil, fmt.Errorf("boot: %w", err)
	}
	console := o.Console
	if console == "" {
		f, err := os.CreateTemp("", "vmdk2kvm-console-*.log")
		if err != nil {
			return nil, err
		}
		f.Close()
		console = f.Name()
		defer os.Remove(console)
	} else if err := os.WriteFile(console, nil, 0o644); err != nil {
		return nil, fmt.Errorf("boot: console file: %w", err)
	}
	abs, err := filepath.Abs(o.Image)
	if err != nil {
		return nil, err
	}
	accel := "tcg"
	if o.KVM {
		accel = "kvm"
	}
	args := []string{"-accel", accel, "-m", fmt.Sprint(o.MemoryMiB), "-smp", fmt.Sprint(o.CPUs),
		"-display", "none", "-monitor", "none", "-no-reboot", "-nodefaults",
		"-serial", "file:" + console}
	drive := fmt.Sprintf("file=%s,format=%s,snapshot=on,cache=unsafe", escapeComma(abs), o.Format)
	switch o.Bus {
	case "", "virtio":
		args = append(args, "-drive", drive+",if=virtio")
	case "scsi":
		args = append(args, "-device", "virtio-scsi-pci,id=scsi0", "-drive", drive+",if=none,id=d0", "-device", "scsi-hd,drive=d0")
	case "ide":
		args = append(args, "-drive", drive+",if=ide")
	default:
		return nil, fmt.Errorf("boot: unknown bus %q", o.Bus)
	}
	switch o.NIC {
	case "", "virtio":
		args = append(args, "-nic", "user,model=virtio-net-pci")
	case "none":
		args = append(args, "-nic", "none")
	default:
		return nil, fmt.Errorf("boot: unknown NIC %q", o.NIC)
	}
	if o.UEFI {
		code := o.OVMFCode
		if code == "" {
			code = "/usr/share/OVMF/OVMF_CODE.fd"
		}
		args = append(args, "-bios", code)
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, o.QEMU, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("boot: start %s: %w", o.QEMU, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	res := &BootResult{}
	stop := func() {
		cmd.Process.Kill()
		<-exited
	}
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		var qerr error
		done := false
		select {
		case qerr = <-exited:
			done = true
		case <-tick.C:
		}
		log, _ := os.ReadFile(console)
		res.Console, res.Elapsed = string(log), time.Since(start)
		if line, ok := findLine(res.Console, o.Marker); ok {
			res.Reached, res.Line = true, line
			if !done {
				stop()
			}
			return res, nil
		}
		if why := failure(res.Console); why != "" {
			res.Reason = why
			if !done {
				stop()
			}
			return res, nil
		}
		if done {
			if ctx.Err() != nil {
				res.Reason = fmt.Sprintf("no marker within %s; console ends with: %s", o.Timeout, lastLines(res.Console, 5))
				return res, nil
			}
			if qerr != nil && res.Console == "" {
				return nil, fmt.Errorf("boot: %s: %v: %s", o.QEMU, qerr, strings.TrimSpace(stderr.String()))
			}
			res.Reason = fmt.Sprintf("qemu exited (%v) before the marker; console ends with: %s", qerr, lastLines(res.Console, 5))
			return res, nil
		}
	}
}

func escapeComma(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func findLine(console, marker string) (string, bool) {
	i := strings.Index(console, marker)
	if i < 0 {
		return "", false
	}
	end := strings.IndexByte(console[i:], '\n')
	if end < 0 {
		return "", false // wait for the whole line
	}
	start := strings.LastIndexByte(console[:i], '\n') + 1
	return strings.TrimSpace(console[start : i+end]), true
}

// failure returns the console lines that explain a failed boot, or "".
func failure(console string) string {
	var why []string
	for _, re := range failurePatterns {
		for _, m := range re.FindAllString(console, 3) {
			m = strings.TrimSpace(m)
			if m != "" && !contains(why, m) {
				why = append(why, m)
			}
		}
	}
	// Wait for the shell prompt or panic, which ends the story, before judging.
	if len(why) == 0 || !(strings.Contains(console, "(initramfs)") || strings.Contains(console, "Kernel panic") ||
		strings.Contains(console, "emergency mode") || strings.Contains(console, "No bootable device")) {
		return ""
	}
	return strings.Join(why, " | ")
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " / ")
}
