package plugins

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestUnifiedDiffAppliesWithPatch checks our diffs against GNU patch: applying
// the diff to old must give new exactly.
func TestUnifiedDiffAppliesWithPatch(t *testing.T) {
	if _, err := exec.LookPath("patch"); err != nil {
		t.Fatal("patch(1) is needed to check diffs: ", err)
	}
	var long []string
	for i := 0; i < 40; i++ {
		long = append(long, "line "+string(rune('a'+i%26))+"\n")
	}
	base := strings.Join(long, "")
	cases := []struct{ name, old, new string }{
		{"replace-middle", base, strings.Replace(base, "line k\n", "line K\nextra\n", 1)},
		{"two-hunks", base, strings.Replace(strings.Replace(base, "line b\n", "", 1), "line y\n", "line Y\n", 1)},
		{"append", "a\nb\n", "a\nb\nc\n"},
		{"prepend", "a\nb\n", "z\na\nb\n"},
		{"no-final-newline", "a\nb", "a\nc"},
		{"to-empty", "a\nb\n", ""},
		{"from-empty", "", "x\ny\n"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := UnifiedDiff("/etc/f", []byte(c.old), []byte(c.new), true)
			if d == "" {
				t.Fatal("empty diff for different contents")
			}
			dir := t.TempDir()
			f := filepath.Join(dir, "f")
			os.WriteFile(f, []byte(c.old), 0o644)
			cmd := exec.Command("patch", "-s", "-u", f)
			cmd.Stdin = strings.NewReader(d)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("patch rejected our diff: %v %s\n%s", err, out, d)
			}
			got, _ := os.ReadFile(f)
			if string(got) != c.new {
				t.Fatalf("patched %q, want %q\n%s", got, c.new, d)
			}
		})
	}
	if d := UnifiedDiff("/x", []byte("same\n"), []byte("same\n"), true); d != "" {
		t.Fatalf("equal contents gave %q", d)
	}
	if d := UnifiedDiff("/x", nil, []byte("new\n"), false); !strings.HasPrefix(d, "--- /dev/null\n+++ b/x\n@@ -0,0 +1 @@\n+new\n") {
		t.Fatalf("creation diff %q", d)
	}
}
