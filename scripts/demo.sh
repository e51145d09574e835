#!/usr/bin/env bash
# make demo: the main jobs end to end on embedded defaults. Generates a
# small test disk, converts it with vmdk2kvm, and checks the result against
# the source with qemu-img; then a warm migration: a vSphere simulator with a
# running VM on the generated disk, a full sync, two incremental syncs while
# the "guest" writes, and a cutover (cmd/demo-warm drives the real binary).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/vmdk2kvm-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
v2k=bin/vmdk2kvm

echo "== generating a 256 MiB test disk (40% random, 20% text, 30% holes, 10% zeros)"
go run ./testdata/gendisk -size 256M -seed 1 "$work/disk.raw"
"$v2k" info "$work/disk.raw" | head -4

echo "== converting it"
"$v2k" convert -O raw "$work/disk.raw" "$work/out.raw"

echo "== verifying with qemu-img"
qemu-img compare -f raw -F raw "$work/disk.raw" "$work/out.raw"
echo "== warm migration (vSphere simulator with CBT, sync x3, cutover)"
warm="${TMPDIR:-/tmp}/vmdk2kvm-warm-demo"
rm -rf "$warm"
go run ./cmd/demo-warm -bin "$v2k" -work "$warm" -size 256M
echo "demo: OK"
