// Package fixers holds vmdk2kvm's built-in fixer plugins (fixers/linux, served
// by cmd/vmdk2kvm-fixer-linux) and, in its tests, the end-to-end proof: a real
// Debian 12 guest built the way VMware has it is converted with and without
// --fix and booted under qemu; only the fixed one boots.
package fixers
