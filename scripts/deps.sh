#!/usr/bin/env bash
# Installs what vmdk2kvm's build, tests and demo need: Debian packages and Go
# tools. Idempotent and quick when everything is present.
set -euo pipefail

pkgs=(
  qemu-utils qemu-system-x86 qemu-block-extra
  nbdkit libnbd-bin
  openssh-server
  libguestfs-tools libguestfs-dev golang-guestfs-dev linux-image-amd64
  libvirt-daemon-system libvirt-clients libxml2-utils
  busybox-static syslinux-common extlinux debootstrap patch
  protobuf-compiler pkg-config gcc make curl bzip2 xz-utils time
)

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Go tools (versions pinned; installed into GOPATH/bin).
gobin="$(go env GOPATH)/bin"
want_tool() { # name module@version
  [ -x "$gobin/$1" ] || { echo "deps: go install $2" >&2; go install "$2"; }
}
want_tool protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
want_tool protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.5.1
exit 0
