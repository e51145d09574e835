// Command gendisk writes a deterministic raw test disk (see internal/diskgen).
//
//	go run ./testdata/gendisk -size 4G -seed 1 disk.raw
package main

import (
	"context"
	"flag"
	"fmt"
	"github.com/vmdk2kvm/vmdk2kvm/internal/units"
	"os"

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
	n, err := units.ParseSize(*size)
	if err == nil {
		_, err = diskgen.Write(context.Background(), flag.Arg(0), n, *seed)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gendisk:", err)
		os.Exit(1)
	}
}
