package main

import (
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/urfave/cli/v2"
)

func TestPasswordSource(t *testing.T) {
	set := flag.NewFlagSet("t", flag.ContinueOnError)
	set.String("password-file", "", "")
	c := cli.NewContext(cli.NewApp(), set, nil)

	// The environment variable, when no file is named.
	t.Setenv(passwordEnv, "from env")
	if p, err := passwordSource(c)(); err != nil || p != "from env" {
		t.Fatalf("env: %q, %v", p, err)
	}
	// A file wins over the environment; its trailing newline is dropped.
	f := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(f, []byte("s3cr3t with spaces \n"), 0o600)
	set.Set("password-file", f)
	if p, err := passwordSource(c)(); err != nil || p != "s3cr3t with spaces " {
		t.Fatalf("file: %q, %v", p, err)
	}
	// A missing file is an error naming the flag.
	set.Set("password-file", filepath.Join(t.TempDir(), "none"))
	if _, err := passwordSource(c)(); err == nil {
		t.Fatal("missing password file accepted")
	}
}
