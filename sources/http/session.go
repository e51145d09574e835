package http

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"

	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/soap"
)

// sessionCookie is the cookie vCenter and ESXi accept on /folder.
const sessionCookie = "vmware_soap_session"

// login opens a vSphere session through the SOAP endpoint (/sdk) of the
// same host, with the same TLS rules, and keeps its cookie for /folder
// requests.
func (c *client) login(ctx context.Context, tlsConf *tls.Config) error {
	pw, err := c.getPassword()
	if err != nil {
		return err
	}
	sdk := &url.URL{Scheme: c.host.Scheme, Host: c.host.Host, Path: "/sdk"}
	sc := soap.NewClient(sdk, false)
	sc.DefaultTransport().TLSClientConfig = tlsConf.Clone()
	vc, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return fmt.Errorf("%s: vSphere API: %w", sdk, err)
	}
	if err := session.NewManager(vc).Login(ctx, url.UserPassword(c.user, pw)); err != nil {
		return fmt.Errorf("%s: login as %q: %w", sdk, c.user, err)
	}
	for _, ck := range sc.Jar.Cookies(sdk) {
		if ck.Name == sessionCookie {
			c.mu.Lock()
			c.cookie = ck
			c.mu.Unlock()
			return nil
		}
	}
	return fmt.Errorf("%s: login as %q gave no %s cookie", sdk, c.user, sessionCookie)
}

// relogin replaces a session the server no longer accepts (a 401 on
// /folder after hours of copying); it reports whether to try again. Callers
// count it as a failed attempt, which bounds the logins.
func (c *client) relogin(ctx context.Context) bool {
	c.mu.Lock()
	session := c.cookie != nil
	c.mu.Unlock()
	if !session {
		return false
	}
	if err := c.login(ctx, c.tls); err != nil {
		c.t.cfg.Log.Warn("vSphere session rejected and logging in again failed", "host", c.host.Host, "err", err)
		return false
	}
	c.t.cfg.Log.Info("vSphere session renewed", "host", c.host.Host)
	return true
}
