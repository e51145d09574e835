package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	httpsrc "github.com/vmdk2kvm/vmdk2kvm/sources/http"
	sshsrc "github.com/vmdk2kvm/vmdk2kvm/sources/ssh"
)

// passwordEnv names the environment variable holding the password of
// remote sources; passwords never come from argv.
const passwordEnv = "VMDK2KVM_PASSWORD"

// remoteFlags are the flags of https:// and ssh:// sources.
func remoteFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "user", Usage: "user for https:// and ssh:// sources (or user@ in the URL)"},
		&cli.StringFlag{Name: "password-file", Usage: "read the remote password from this file (else $" + passwordEnv + ", else a prompt on a terminal)"},
		&cli.IntFlag{Name: "connections", Value: 4, Usage: "parallel connections (https) or reads in flight (ssh) per remote file"},
		&cli.StringFlag{Name: "thumbprint", Usage: "trust the https server whose certificate has this SHA-256 (or SHA-1) fingerprint"},
		&cli.BoolFlag{Name: "insecure", Usage: "do not verify the https server's certificate (unsafe; prefer --thumbprint)"},
		&cli.StringFlag{Name: "http-auth", Value: "session", Usage: "https authentication with --user: session (vSphere login, cookie) or basic"},
		&cli.StringSliceFlag{Name: "known-hosts", Usage: "known_hosts file for ssh:// (default ~/.ssh/known_hosts)"},
		&cli.StringFlag{Name: "ssh-host-key-fingerprint", Usage: "trust the ssh host key with this fingerprint (SHA256:... as ssh-keygen -l prints it)"},
		&cli.StringSliceFlag{Name: "ssh-key", Usage: "private key file for ssh:// (default: ssh-agent, then ~/.ssh/id_*)"},
		&cli.StringFlag{Name: "ssh-mode", Value: "auto", Usage: "ssh reads: auto, sftp, or exec (dd through exec channels, for hosts without sftp)"},
	}
}

// flagString reads a flag when the command has it (c may be nil).
func flagString(c *cli.Context, name string) string {
	if c == nil {
		return ""
	}
	return c.String(name)
}

// passwordSource returns how to get the password when a server asks for
// one: --password-file, $VMDK2KVM_PASSWORD, or a prompt on the terminal.
func passwordSource(c *cli.Context) func() (string, error) {
	return func() (string, error) {
		if f := flagString(c, "password-file"); f != "" {
			b, err := os.ReadFile(f)
			if err != nil {
				return "", fmt.Errorf("--password-file: %w", err)
			}
			return strings.TrimRight(string(b), "\r\n"), nil
		}
		if p, ok := os.LookupEnv(passwordEnv); ok {
			return p, nil
		}
		tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
		if err != nil || !term.IsTerminal(int(tty.Fd())) {
			if tty != nil {
				tty.Close()
			}
			return "", errors.New("a password is needed: give it with --password-file or $" + passwordEnv + " (no terminal to prompt on)")
		}
		defer tty.Close()
		fmt.Fprint(tty, "password: ")
		b, err := term.ReadPassword(int(tty.Fd()))
		fmt.Fprintln(tty)
		if err != nil {
			return "", fmt.Errorf("reading the password: %w", err)
		}
		return string(b), nil
	}
}

func httpConfig(c *cli.Context) httpsrc.Config {
	cfg := httpsrc.Config{Password: passwordSource(c), Log: slog.Default()}
	if c != nil {
		cfg.User, cfg.Connections = c.String("user"), c.Int("connections")
		cfg.Thumbprint, cfg.Insecure, cfg.Auth = c.String("thumbprint"), c.Bool("insecure"), c.String("http-auth")
	}
	return cfg
}

func sshConfig(c *cli.Context) sshsrc.Config {
	cfg := sshsrc.Config{Password: passwordSource(c), Log: slog.Default()}
	if c != nil {
		cfg.User, cfg.Connections, cfg.Mode = c.String("user"), c.Int("connections"), c.String("ssh-mode")
		cfg.HostKeyFingerprint = c.String("ssh-host-key-fingerprint")
		if v := c.StringSlice("known-hosts"); len(v) > 0 {
			cfg.KnownHosts = v
		}
		if v := c.StringSlice("ssh-key"); len(v) > 0 {
			cfg.KeyFiles = v
		}
	}
	return cfg
}

// remoteStats is what the remote transports did, for --json outputs; nil
// when nothing was read remotely.
func remoteStats(h *httpsrc.Transport, s *sshsrc.Transport) map[string]any {
	out := map[string]any{}
	if st := h.Stats(); st.Requests > 0 {
		out["https"] = st
	}
	if st := s.Stats(); st.Cache.Hits+st.Cache.Misses+st.Cache.Bypassed > 0 {
		out["ssh"] = st
	}
	if len(out) == 0 {
		return nil
	}
	return out
}
