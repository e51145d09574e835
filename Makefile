# vmdk2kvm: see README.md. Every target that needs tools depends on deps,
# which installs them idempotently.
GO       ?= go
BIN      := bin
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
export PATH := $(shell $(GO) env GOPATH)/bin:$(PATH)

.PHONY: all deps build test demo bench lint proto guestfs fixers clean

all: build

deps:
	@scripts/deps.sh

# The main binary is pure Go.
build:
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/vmdk2kvm ./cmd/vmdk2kvm

test: deps build guestfs
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 75m ./...

demo: deps build
	@scripts/demo.sh

bench: deps build
	@scripts/bench.sh

lint: guestfs
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...

# Debian's libguestfs Go binding is one file without a go.mod and is not served by
# the module proxy: copy it into the git-ignored third_party/guestfs, which go.mod
# replaces libguestfs.org/guestfs with. Only cmd/vmdk2kvm-guest imports it.
GUESTFS_GO := /usr/share/gocode/src/libguestfs.org/guestfs/guestfs.go
guestfs: third_party/guestfs/go.mod
third_party/guestfs/go.mod: $(GUESTFS_GO)
	mkdir -p third_party/guestfs
	cp $(GUESTFS_GO) third_party/guestfs/guestfs.go
	printf 'module libguestfs.org/guestfs\n\ngo 1.18\n' > $@

# The guest helper (the only cgo binary: libguestfs) and the built-in fixer
# plugins, next to the main binary where vmdk2kvm looks for them.
fixers: guestfs
	$(GO) build -o $(BIN)/vmdk2kvm-guest ./cmd/vmdk2kvm-guest
	CGO_ENABLED=0 $(GO) build -o $(BIN)/vmdk2kvm-fixer-linux ./cmd/vmdk2kvm-fixer-linux

# Regenerates the plugin protocol's Go code (committed) from plugins/proto/*.proto.
proto: deps
	protoc -I plugins/proto --go_out=plugins/proto --go_opt=paths=source_relative \
	  --go-grpc_out=plugins/proto --go-grpc_opt=paths=source_relative plugins/proto/*.proto

clean:
	rm -rf $(BIN)
