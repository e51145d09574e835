// Command remoteread reads a remote disk the way `vmdk2kvm convert` does
// (the https or ssh transport, the VMDK/raw formats, the parallel copy
// engine) but discards the bytes instead of writing a sink, so bench/remote.sh
// compares the read path alone with curl/ssh writing to /dev/null. It prints
// one JSON line: bytes, seconds, bytes per second, transport counters.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"log"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/copier"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	httpsrc "github.com/vmdk2kvm/vmdk2kvm/sources/http"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
	sshsrc "github.com/vmdk2kvm/vmdk2kvm/sources/ssh"
	"github.com/vmdk2kvm/vmdk2kvm/sources/vmdk"
)

// discard is a block.Writer that drops everything.
type discard struct{}

func (discard) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }
func (discard) Zero(int64, int64) error                { return nil }
func (discard) Flush() error                           { return nil }

func main() {
	conns := flag.Int("connections", 4, "connections (https) / reads in flight (ssh)")
	thumb := flag.String("thumbprint", "", "https certificate SHA-256")
	key := flag.String("ssh-key", "", "ssh private key")
	kh := flag.String("known-hosts", "", "ssh known_hosts")
	workers := flag.Int("workers", 0, "copy workers (0: the copier's default)")
	flag.Parse()
	if flag.NArg() != 1 {
		log.Fatal("usage: remoteread [flags] URL")
	}
	url := flag.Arg(0)
	quiet := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ht := httpsrc.New(httpsrc.Config{Connections: *conns, Thumbprint: *thumb, Log: quiet})
	st := sshsrc.New(sshsrc.Config{Connections: *conns, KeyFiles: []string{*key}, KnownHosts: []string{*kh}, AgentSocket: "none", Log: quiet})
	reg := sources.NewRegistry().AddTransport(ht).AddTransport(st).AddFormat(vmdk.Format{}).AddFormat(raw.Format{})
	ctx := context.Background()
	start := time.Now()
	img, err := reg.Open(ctx, url, sources.Options{})
	if err != nil {
		log.Fatal(err)
	}
	stats, err := copier.Copy(ctx, img, discard{}, copier.Options{Workers: *workers, TargetZeroed: true})
	if err != nil {
		log.Fatal(err)
	}
	img.Close()
	secs := time.Since(start).Seconds()
	out := map[string]any{"url": url, "format": img.Info.Format, "bytes": img.Size(), "read": stats.Read,
		"seconds": secs, "bytes_per_second": int64(float64(stats.Read) / secs)}
	if strings.HasPrefix(url, "http") {
		out["http"] = ht.Stats()
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
