// Command gendisk writes a deterministic raw test disk (see internal/diskgen).
//
//	go run ./testdata/gendisk -size 4G -seed 1 disk.raw
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/vmdk2kvm/vmdk2kvm/internal/diskgen"
)

func main() {
	size := flag.String("size", "64M", "disk size (K, M, G suffixes)")
	seed := flag.Uint64("seed", 1, "random seed")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: gendisk [-size N] [-seed S] OUT")
		os.Exit(2)
	}
	n, err := parseSize(*size)
	if err == nil {
		_, err = diskgen.Write(context.Background(), flag.Arg(0), n, *seed)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gendisk:", err)
		os.Exit(1)
	}
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n * mult, nil
}
