# vmdk2kvm: see README.md. Every target that needs tools depends on deps,
# which installs them idempotently.
GO       ?= go
BIN      := bin
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
export PATH := $(shell $(GO) env GOPATH)/bin:$(PATH)

.PHONY: all deps build test demo bench lint proto clean

all: build

deps:
	@scripts/deps.sh

# The main binary is pure Go.
build:
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/vmdk2kvm ./cmd/vmdk2kvm

test: deps build
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 75m ./...

demo: deps build
	@scripts/demo.sh

bench: deps build
	@scripts/bench.sh

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...

clean:
	rm -rf $(BIN)
