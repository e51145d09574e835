// Command demo-warm runs a whole warm migration on an embedded default, for
// `make demo`: it starts govmomi's vSphere simulator (extended with change
// tracking by cbt/cbttest) with a running VM whose disk is the generated
// test disk, runs the real `vmdk2kvm sync` for a full round, changes the disk
// between rounds as a running guest would, runs two incremental rounds and
// a cutover, checks every replica against the disk with qemu-img, and prints
// the report's summary and where the HTML page is.
//
// It is a demo harness, not the product: the product binary is given with
// -bin and talks to the simulator over HTTPS like to any vCenter.
package main

import (
	"context"
	"flag"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/internal/units"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/cbt"
	"github.com/vmdk2kvm/vmdk2kvm/cbt/cbttest"
	"github.com/vmdk2kvm/vmdk2kvm/vmware/vmwaretest"
)

func main() {
	bin := flag.String("bin", "bin/vmdk2kvm", "the vmdk2kvm binary")
	work := flag.String("work", "", "work folder (default: a new temporary folder, kept)")
	sizeFlag := flag.String("size", "256M", "disk size (bytes, or with a K, M or G suffix)")
	bench := flag.String("bench", "", "instead of the demo, benchmark a full and a 1% incremental round on this raw disk (bench/warm.sh)")
	flag.Parse()
	// The simulator's servers log every TLS handshake that govmomi's
	// thumbprint check makes fail on purpose (it verifies, then pins):
	// noise for a demo, so the standard logger is silenced.
	log.SetOutput(io.Discard)
	size, err := parseSize(*sizeFlag)
	if err == nil && *bench != "" {
		err = runBench(*bin, *work, *bench)
	} else if err == nil {
		err = run(*bin, *work, size)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo-warm: %v\n", err)
		os.Exit(1)
	}
}

func run(bin, work string, size int64) error {
	ctx := context.Background()
	var err error
	if bin, err = filepath.Abs(bin); err != nil {
		return err
	}
	if work == "" {
		if work, err = os.MkdirTemp("", "vmdk2kvm-warm-demo-"); err != nil {
			return err
		}
	}
	ds, target := filepath.Join(work, "datastore"), filepath.Join(work, "target")
	for _, d := range []string{ds, target} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	step("starting the vSphere simulator with a running VM on a %d MiB generated disk", size>>20)
	env, err := vmwaretest.Start(ctx, ds)
	if err != nil {
		return err
	}
	defer env.Close()
	h, err := cbttest.Add(ctx, env, cbttest.Options{Name: "warm01", Size: size, Seed: 1, PoweredOn: true, PageAreas: 64})
	if err != nil {
		return err
	}
	defer h.Close()
	uri := fmt.Sprintf("vsphere://%s@%s/%s/vm/%s", vmwaretest.User, h.Proxy.URL.Host, vmwaretest.Datacenter, h.Name)
	// The simulator's certificate is self-signed: pin it, as with a vCenter.
	common := []string{"--target", target, "--thumbprint", h.Proxy.Thumbprint(), "--yes"}

	step("round 1: vmdk2kvm sync %s --enable-cbt --report (full copy of the allocated areas)", uri)
	if err := v2k(bin, args("sync", uri, append(common, "--enable-cbt", "--report")...)); err != nil {
		return err
	}
	if err := compare(target, h.Flat); err != nil {
		return err
	}
	for i := range 2 {
		n, err := h.WriteRandomRuns(uint64(100+i), 24, 64<<10, 1<<20)
		if err != nil {
			return err
		}
		step("the guest wrote %.1f MiB in 24 scattered runs; round %d: incremental sync", float64(n)/(1<<20), i+2)
		h.Proxy.Reset()
		if err := v2k(bin, args("sync", uri, append(common, "--report")...)); err != nil {
			return err
		}
		fmt.Printf("   datastore served %.2f MiB for %.2f MiB written by the guest\n", float64(h.Proxy.FolderBytes())/(1<<20), float64(n)/(1<<20))
		if err := compare(target, h.Flat); err != nil {
			return err
		}
	}
	n, err := h.WriteRandomRuns(200, 8, 64<<10, 256<<10)
	if err != nil {
		return err
	}
	step("the guest wrote %.1f MiB more; cutover: shutdown, final round, overlay, domain XML (fix stage skipped: the demo disk holds no OS)", float64(n)/(1<<20))
	if err := v2k(bin, args("cutover", uri, append(common, "--no-fix", "--force", "--shutdown-timeout", "20s")...)); err != nil {
		return err
	}
	if err := compare(target, h.Flat); err != nil {
		return err
	}
	st, err := cbt.LoadState(filepath.Join(target, cbt.StateFile))
	if err != nil {
		return err
	}
	if err := check("qemu-img", "compare", "-f", "qcow2", "-F", "raw", filepath.Join(target, st.Cutover.Overlays[0]), h.Flat); err != nil {
		return err
	}
	step("done: replica and cutover overlay identical to the VM's disk (qemu-img compare)")
	fmt.Printf("   state:   %s\n   reports: %s\n            %s\n   domain:  %s\n",
		filepath.Join(target, cbt.StateFile), filepath.Join(target, "sync-report.html"),
		filepath.Join(target, "cutover-report.html"), filepath.Join(target, st.Cutover.DomainXML))
	return nil
}

// parseSize reads -size: a positive multiple of 1 MiB.
func parseSize(s string) (int64, error) {
	n, err := units.ParseSize(s)
	if err != nil || n <= 0 || n%(1<<20) != 0 {
		return 0, fmt.Errorf("-size %q: want a positive multiple of 1 MiB", s)
	}
	return n, nil
}

func step(format string, args ...any) {
	fmt.Printf("== %s %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// timedRun runs the binary and returns its wall time and peak RSS (KiB).
func timedRun(bin string, args []string) (time.Duration, int64, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "VMDK2KVM_PASSWORD="+vmwaretest.Password)
	out, err := os.CreateTemp("", "warm-bench-*.log")
	if err != nil {
		return 0, 0, err
	}
	defer os.Remove(out.Name())
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	t0 := time.Now()
	err = cmd.Run()
	d := time.Since(t0)
	if err != nil {
		b, _ := os.ReadFile(out.Name())
		return d, 0, fmt.Errorf("vmdk2kvm %s: %w\n%s", args[0], err, b)
	}
	var rss int64
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		rss = ru.Maxrss
	}
	return d, rss, nil
}

// runBench measures a full round and an incremental round with 1% of the
// disk changed in scattered 64 KiB-1 MiB runs, through the simulator's
// /folder (bytes counted by the proxy in front of it), and qemu-img convert
// of the same disk as the reference for the full copy.
func runBench(bin, work, disk string) error {
	ctx := context.Background()
	var err error
	if bin, err = filepath.Abs(bin); err != nil {
		return err
	}
	if work == "" {
		if work, err = os.MkdirTemp("", "vmdk2kvm-warm-bench-"); err != nil {
			return err
		}
		defer os.RemoveAll(work)
	}
	ds, target := filepath.Join(work, "datastore"), filepath.Join(work, "target")
	for _, d := range []string{ds, target} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	env, err := vmwaretest.Start(ctx, ds)
	if err != nil {
		return err
	}
	defer env.Close()
	h, err := cbttest.Add(ctx, env, cbttest.Options{Name: "bench01", From: disk, CBT: true, PoweredOn: true, PageAreas: 256})
	if err != nil {
		return err
	}
	defer h.Close()
	size := h.Size()
	uri := fmt.Sprintf("vsphere://%s@%s/%s/vm/%s", vmwaretest.User, h.Proxy.URL.Host, vmwaretest.Datacenter, h.Name)
	sync := args("sync", uri, "--target", target, "--thumbprint", h.Proxy.Thumbprint(), "--yes")

	h.Proxy.Reset()
	tFull, rssFull, err := timedRun(bin, sync)
	if err != nil {
		return err
	}
	readFull := h.Proxy.FolderBytes()
	st, err := cbt.LoadState(filepath.Join(target, cbt.StateFile))
	if err != nil {
		return err
	}
	changedFull := st.Rounds[0].Totals.Changed

	// 1% of the disk in scattered runs of 64 KiB to 1 MiB.
	var wrote int64
	for seed := uint64(1); wrote < size/100; seed++ {
		n, err := h.WriteRandomRuns(seed, 1, 64<<10, 1<<20)
		if err != nil {
			return err
		}
		wrote += n
	}
	h.Proxy.Reset()
	tInc, rssInc, err := timedRun(bin, sync)
	if err != nil {
		return err
	}
	readInc := h.Proxy.FolderBytes()
	if st, err = cbt.LoadState(filepath.Join(target, cbt.StateFile)); err != nil {
		return err
	}
	changedInc := st.Rounds[1].Totals.Changed
	if err := check("qemu-img", "compare", "-f", "qcow2", "-F", "raw", filepath.Join(target, st.Disks[0].Replica), h.Flat); err != nil {
		return err
	}

	ref := filepath.Join(work, "reference.qcow2")
	t0 := time.Now()
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", h.Flat, ref).CombinedOutput(); err != nil {
		return fmt.Errorf("qemu-img convert: %v: %s", err, out)
	}
	tRef := time.Since(t0)
	os.Remove(ref)
	mib := func(n int64) float64 { return float64(n) / (1 << 20) }
	fmt.Printf("warm sync bench: %.1f GiB generated disk through the vSphere simulator's /folder (HTTPS, counting proxy)\n", float64(size)/(1<<30))
	fmt.Printf("  full round:         %7.2f s  changed %8.1f MiB  read from source %8.1f MiB  peak RSS %d MiB\n", tFull.Seconds(), mib(changedFull), mib(readFull), rssFull>>10)
	fmt.Printf("  incremental (1%%):   %7.2f s  changed %8.1f MiB  read from source %8.1f MiB  peak RSS %d MiB  (guest wrote %.1f MiB)\n", tInc.Seconds(), mib(changedInc), mib(readInc), rssInc>>10, mib(wrote))
	fmt.Printf("  reference qemu-img convert -O qcow2 (local raw, full): %.2f s; full round / qemu-img = %.2f\n", tRef.Seconds(), tFull.Seconds()/tRef.Seconds())
	limit := 0.03*tFull.Seconds() + 1
	fmt.Printf("  incremental / full = %.4f (%.2f s; target <= 3%% of full + 1 s = %.2f s): %s\n", tInc.Seconds()/tFull.Seconds(), tInc.Seconds(), limit, verdict(tInc.Seconds() <= limit))
	fmt.Printf("  incremental bytes read / bytes changed = %.3f (target <= 1.1): %s\n", float64(readInc)/float64(changedInc), verdict(float64(readInc) <= 1.1*float64(changedInc)))
	fmt.Printf("  full bytes read / allocated bytes = %.3f\n", float64(readFull)/float64(changedFull))
	return nil
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

// args puts the flags before the URI (urfave/cli stops at the first argument).
func args(sub, uri string, flags ...string) []string {
	return append(append([]string{sub}, flags...), uri)
}

func v2k(bin string, args []string) error {
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "VMDK2KVM_PASSWORD="+vmwaretest.Password)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stdout
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("vmdk2kvm %s: %w", strings.Join(args[:1], " "), err)
	}
	return nil
}

func compare(target, flat string) error {
	st, err := cbt.LoadState(filepath.Join(target, cbt.StateFile))
	if err != nil {
		return err
	}
	return check("qemu-img", "compare", "-f", st.Disks[0].Format, "-F", "raw", filepath.Join(target, st.Disks[0].Replica), flat)
}

func check(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	fmt.Printf("   %s", out)
	if err != nil {
		return fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return nil
}
