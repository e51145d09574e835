package main

import (
	"github.com/urfave/cli/v2"

	"github.com/vmdk2kvm/vmdk2kvm/qcow2"
	"github.com/vmdk2kvm/vmdk2kvm/sinks"
	rawsink "github.com/vmdk2kvm/vmdk2kvm/sinks/raw"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	"github.com/vmdk2kvm/vmdk2kvm/sources/file"
	httpsrc "github.com/vmdk2kvm/vmdk2kvm/sources/http"
	"github.com/vmdk2kvm/vmdk2kvm/sources/nbdsrc"
	"github.com/vmdk2kvm/vmdk2kvm/sources/ova"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
	sshsrc "github.com/vmdk2kvm/vmdk2kvm/sources/ssh"
	"github.com/vmdk2kvm/vmdk2kvm/sources/vmdk"
)

// newSources returns every transport and format this binary reads, with
// remote transports at their defaults. Formats are probed in order; raw
// accepts anything and stays last.
func newSources() *sources.Registry { return sourcesFor(nil) }

// sourcesFor is newSources with a command's remote flags (remote.go)
// applied to the https and ssh transports.
func sourcesFor(c *cli.Context) *sources.Registry { r, _ := sourcesWithStats(c); return r }

// sourcesWithStats is sourcesFor that also returns the remote transports'
// counters (requests, retries, cache hits) for --json outputs.
func sourcesWithStats(c *cli.Context) (*sources.Registry, func() map[string]any) {
	r := sources.NewRegistry()
	h, s := httpsrc.New(httpConfig(c)), sshsrc.New(sshConfig(c))
	r.AddTransport(file.Transport{})
	r.AddTransport(h)
	r.AddTransport(s)
	r.AddDevices(nbdsrc.Opener{})
	r.AddFormat(ova.Format{Disks: r})
	r.AddFormat(vmdk.Format{})
	r.AddFormat(qcow2.Format{Backing: r.OpenIn})
	r.AddFormat(raw.Format{})
	return r, func() map[string]any { return remoteStats(h, s) }
}

// newSinks returns every output format this binary writes.
func newSinks() *sinks.Registry {
	return sinks.NewRegistry(rawsink.Format{}, qcow2.SinkFormat{})
}

// defaultOutputFormat is qcow2 where it is built in, else raw.
func defaultOutputFormat(r *sinks.Registry) string {
	for _, n := range r.Names() {
		if n == "qcow2" {
			return n
		}
	}
	return "raw"
}
