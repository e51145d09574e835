package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/filters"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
)

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "export a source disk over NBD (for qemu-img, nbdcopy, libguestfs, virt-v2v) until interrupted",
		Description: "Opens SRC like convert does (any format and transport) and serves it, read-only unless\n" +
			"--writable (writes then go to a copy-on-write overlay in memory/temp space, never into SRC).\n" +
			"Prints the NBD URI to connect to on stdout once ready.",
		ArgsUsage: "SRC",
		Flags: append(sourceFlags(),
			&cli.StringFlag{Name: "socket", Usage: "serve on this unix socket (default: a new socket in the temp folder)"},
			&cli.StringFlag{Name: "listen", Usage: "serve on TCP instead: [HOST]:PORT or PORT (HOST defaults to 127.0.0.1; PORT 0 picks one)"},
			&cli.StringFlag{Name: "export", Usage: "export name (default: the empty, default export)"},
			&cli.StringFlag{Name: "description", Usage: "export description shown to clients (default: SRC and its format)"},
			&cli.BoolFlag{Name: "writable", Usage: "accept writes, into a copy-on-write overlay (SRC is never written)"},
			&cli.StringFlag{Name: "tls", Usage: "off, on (clients may use TLS) or require (default: on when --tls-cert is given)"},
			&cli.StringFlag{Name: "tls-cert", Usage: "server certificate (PEM)"},
			&cli.StringFlag{Name: "tls-key", Usage: "server private key (PEM)"},
			&cli.StringFlag{Name: "tls-ca", Usage: "require client certificates signed by this CA (PEM)"},
			&cli.StringFlag{Name: "pidfile", Usage: "write the process id here once serving (removed on exit)"},
			&cli.BoolFlag{Name: "exit-with-parent", Usage: "stop serving when the parent process exits"},
		),
		Action: runServe,
	}
}

func runServe(c *cli.Context) error {
	if c.NArg() != 1 {
		return fmt.Errorf("serve: want exactly one SRC, got %d arguments", c.NArg())
	}
	ctx, cancel := context.WithCancel(c.Context)
	defer cancel()
	if c.Bool("exit-with-parent") {
		go exitWithParent(ctx, cancel)
	}
	tlsCfg, require, err := serveTLS(c)
	if err != nil {
		return err
	}
	src := c.Args().First()
	img, err := sourcesFor(c).Open(ctx, src, sourceOptions(c))
	if err != nil {
		return err
	}
	defer img.Close()
	var dev block.Device = img.Device // not the Image: its optional methods (block.FileMapper) stay visible
	if c.Bool("writable") {
		cow, err := filters.NewCOW(img, filters.COWOptions{})
		if err != nil {
			return fmt.Errorf("serve %s: overlay: %w", src, err)
		}
		defer cow.Close()
		dev = cow
	}
	desc := c.String("description")
	if desc == "" {
		desc = fmt.Sprintf("vmdk2kvm: %s (%s)", src, img.Info.Format)
	}
	srv, err := nbd.NewServer(nbd.ServerOptions{TLS: tlsCfg, RequireTLS: require},
		nbd.Export{Name: c.String("export"), Description: desc, Device: dev, Writable: c.Bool("writable")})
	if err != nil {
		return err
	}
	ln, target, err := serveListen(c)
	if err != nil {
		return err
	}
	target.Export, target.TLS = c.String("export"), require
	if pf := c.String("pidfile"); pf != "" {
		if err := os.WriteFile(pf, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			ln.Close()
			return fmt.Errorf("serve: pidfile: %w", err)
		}
		defer os.Remove(pf)
	}
	fmt.Fprintln(c.App.Writer, target.String())
	return srv.Serve(ctx, ln)
}

// serveListen opens the listener: a unix socket unless --listen asks for TCP.
func serveListen(c *cli.Context) (net.Listener, nbd.Target, error) {
	if addr := c.String("listen"); addr != "" {
		if c.String("socket") != "" {
			return nil, nbd.Target{}, errors.New("serve: --socket and --listen exclude each other")
		}
		if !strings.Contains(addr, ":") {
			addr = ":" + addr
		}
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, nbd.Target{}, fmt.Errorf("serve: --listen %q: %w", addr, err)
		}
		if host == "" {
			host = "127.0.0.1"
		}
		ln, err := net.Listen("tcp", net.JoinHostPort(host, port))
		if err != nil {
			return nil, nbd.Target{}, fmt.Errorf("serve: %w", err)
		}
		return ln, nbd.Target{Network: "tcp", Address: ln.Addr().String()}, nil
	}
	sock := c.String("socket")
	if sock == "" {
		sock = filepath.Join(os.TempDir(), fmt.Sprintf("vmdk2kvm-nbd-%d.sock", os.Getpid()))
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return nil, nbd.Target{}, fmt.Errorf("serve: %w", err)
	}
	return ln, nbd.Target{Network: "unix", Address: sock}, nil // the socket file goes with ln.Close
}

// serveTLS builds the server TLS configuration from the flags.
func serveTLS(c *cli.Context) (*tls.Config, bool, error) {
	cert, key, ca := c.String("tls-cert"), c.String("tls-key"), c.String("tls-ca")
	mode := c.String("tls")
	if mode == "" {
		mode = "off"
		if cert != "" {
			mode = "on"
		}
	}
	switch mode {
	case "off":
		if cert != "" || key != "" || ca != "" {
			return nil, false, errors.New("serve: --tls=off with TLS files given")
		}
		return nil, false, nil
	case "on", "require":
	default:
		return nil, false, fmt.Errorf("serve: --tls=%q: want off, on or require", mode)
	}
	if cert == "" || key == "" {
		return nil, false, fmt.Errorf("serve: --tls=%s needs --tls-cert and --tls-key", mode)
	}
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return nil, false, fmt.Errorf("serve: TLS certificate %s: %w", cert, err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	if ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			return nil, false, fmt.Errorf("serve: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, false, fmt.Errorf("serve: %s: no PEM certificate", ca)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, mode == "require", nil
}

// exitWithParent cancels when the parent process goes away (the process is
// then re-parented, so its parent id changes).
func exitWithParent(ctx context.Context, cancel func()) {
	parent := os.Getppid()
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if os.Getppid() != parent {
				cancel()
				return
			}
		}
	}
}
