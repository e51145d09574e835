package ssh

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	gossh "golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// otherKeyTypes says known_hosts knows the host only by keys of other types
// than the one offered: the handshake is retried asking for those types.
type otherKeyTypes struct{ types []string }

func (e *otherKeyTypes) Error() string {
	return "host known by other key types: " + strings.Join(e.types, ", ")
}

func (e *otherKeyTypes) algorithms() []string {
	var out []string
	for _, t := range e.types {
		if t == gossh.KeyAlgoRSA {
			out = append(out, gossh.KeyAlgoRSASHA512, gossh.KeyAlgoRSASHA256)
		}
		out = append(out, t)
	}
	return out
}

// hostKeyCallback checks the host key against the pinned fingerprint, or
// known_hosts; an unknown key is refused with how to trust it.
func (t *Transport) hostKeyCallback() (gossh.HostKeyCallback, error) {
	if want := t.cfg.HostKeyFingerprint; want != "" {
		if !strings.HasPrefix(want, "SHA256:") {
			return nil, fmt.Errorf("--ssh-host-key-fingerprint %q: want SHA256:... as `ssh-keygen -lf KEY` prints it", want)
		}
		return func(host string, _ net.Addr, key gossh.PublicKey) error {
			if got := gossh.FingerprintSHA256(key); got != want {
				return fmt.Errorf("host key of %s is %s %s, not the pinned %s: refusing to connect", host, key.Type(), got, want)
			}
			return nil
		}, nil
	}
	var files []string
	for _, f := range t.cfg.KnownHosts {
		if _, err := os.Stat(f); err == nil {
			files = append(files, f)
		}
	}
	var kh gossh.HostKeyCallback
	if len(files) > 0 {
		var err error
		if kh, err = knownhosts.New(files...); err != nil {
			return nil, fmt.Errorf("known_hosts: %w", err)
		}
	}
	where := strings.Join(t.cfg.KnownHosts, ", ")
	if where == "" {
		where = "~/.ssh/known_hosts"
	}
	return func(host string, remote net.Addr, key gossh.PublicKey) error {
		fp := gossh.FingerprintSHA256(key)
		if kh != nil {
			err := kh(host, remote, key)
			if err == nil {
				return nil
			}
			var ke *knownhosts.KeyError
			if !errors.As(err, &ke) {
				return err
			}
			if len(ke.Want) > 0 {
				var types []string
				sameType := false
				for _, w := range ke.Want {
					types = append(types, w.Key.Type())
					sameType = sameType || w.Key.Type() == key.Type()
				}
				if !sameType {
					return &otherKeyTypes{types: types}
				}
				return fmt.Errorf("host key of %s CHANGED: it offers %s %s, %s:%d knows another: refusing to connect (possible man-in-the-middle); if the host was reinstalled, fix that line",
					host, key.Type(), fp, ke.Want[0].Filename, ke.Want[0].Line)
			}
		}
		host0 := host
		h, port, err := net.SplitHostPort(host)
		if err == nil {
			host0 = h
		} else {
			port = "22"
		}
		return fmt.Errorf("host key of %s is unknown (%s %s): refusing to connect; if that is the host's key, trust it with --ssh-host-key-fingerprint %s, or add it to known_hosts (%s), e.g. `ssh-keyscan -p %s %s >> ~/.ssh/known_hosts`",
			host, key.Type(), fp, fp, where, port, host0)
	}, nil
}
