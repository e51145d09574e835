// Command vmdk2kvm-fixer-linux is the built-in Linux fixer plugin (see
// fixers/linux). It speaks the same plugin protocol as any third-party fixer and
// is started by vmdk2kvm, never by hand.
package main

import (
	"github.com/vmdk2kvm/vmdk2kvm/fixers/linux"
	"github.com/vmdk2kvm/vmdk2kvm/plugins"
)

func main() { plugins.Serve(linux.New()) }
