// Command vmdk2kvm-guest is the guest helper: the one process of a vmdk2kvm run
// that links libguestfs (cgo, Debian's Go binding). It opens one image (a file,
// e.g. a qcow2 overlay, or an NBD URI), launches the appliance, inspects the
// guest, mounts its filesystems, and serves the Guest API (plugins/proto) on a
// unix socket to the vmdk2kvm host, which brokers it to fixer plugins and
// records every mutation. It prints READY on stdout when serving, and exits
// after Shutdown (which unmounts and syncs) or when stdin closes.
//
// Usage: vmdk2kvm-guest --socket PATH --image FILE|nbd+unix:///?socket=S [--format FMT] [--readonly]
//
// The appliance runs under TCG unless VMDK2KVM_GUESTFS_KVM=1 is set and
// /dev/kvm opens: a present /dev/kvm is not a working one (nested PVM hosts
// hang or abort stock guest kernels), and TCG always works.
package main

import (
	"flag"
	"fmt"
	"os"
)

func main() {
	var o options
	flag.StringVar(&o.socket, "socket", "", "unix socket to serve the Guest API on")
	flag.StringVar(&o.image, "image", "", "disk image file or NBD URI")
	flag.StringVar(&o.format, "format", "", "image format (raw, qcow2, vmdk)")
	flag.BoolVar(&o.readonly, "readonly", false, "never write the image (changes go to a throwaway overlay)")
	flag.Parse()
	if o.socket == "" || o.image == "" {
		fmt.Fprintln(os.Stderr, "vmdk2kvm-guest: --socket and --image are required")
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "vmdk2kvm-guest:", err)
		os.Exit(1)
	}
}

type options struct {
	socket, image, format string
	readonly              bool
}
