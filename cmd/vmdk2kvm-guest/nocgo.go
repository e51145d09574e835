//go:build !cgo

package main

import "errors"

func run(options) error {
	return errors.New("built without cgo: libguestfs is unavailable (build with CGO_ENABLED=1)")
}
