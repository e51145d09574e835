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

echo "== a 256 MiB test disk (40% random, 20% text, 30% holes, 10% zeros) as a VMDK snapshot chain"
go run ./testdata/gendisk -size 256M -seed 1 "$work/disk.raw"
qemu-img convert -f raw -O vmdk -o subformat=monolithicSparse "$work/disk.raw" "$work/web01.vmdk"
qemu-img create -q -f vmdk -b web01.vmdk -F vmdk "$work/web01-000001.vmdk"
qemu-io -f vmdk -c 'write -P 0x42 1M 3M' -c 'write -z 64M 1M' "$work/web01-000001.vmdk" >/dev/null
"$v2k" info "$work/web01-000001.vmdk"

echo "== flattening the chain into qcow2"
"$v2k" convert "$work/web01-000001.vmdk" "$work/web01.qcow2"

echo "== verifying with qemu-img (check, compare with the chain)"
qemu-img check -q "$work/web01.qcow2"
qemu-img compare -f vmdk -F qcow2 "$work/web01-000001.vmdk" "$work/web01.qcow2"
echo "== warm migration (vSphere simulator with CBT, sync x3, cutover)"
warm="${TMPDIR:-/tmp}/vmdk2kvm-warm-demo"
rm -rf "$warm"
go run ./cmd/demo-warm -bin "$v2k" -work "$warm" -size 256M
echo "demo: OK"
