package sources

import (
	"context"
	"errors"
	"strings"
	"testing"
)

func TestUnsupportedSchemeRedactsPassword(t *testing.T) {
	_, err := NewRegistry().Open(context.Background(), "gopher://root:s3cret@host/disk.vmdk", Options{})
	if !errors.Is(err, ErrUnsupported) || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("err = %v", err)
	}
	if got := Redact("https://u:pw@h/x?y=1"); strings.Contains(got, "pw") {
		t.Fatalf("Redact kept the password: %s", got)
	}
	if got := Scheme("/tmp/a://b"); got != "file" {
		t.Fatalf("Scheme of a path = %q", got)
	}
}
