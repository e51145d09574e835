#!/usr/bin/env bash
# qcow2 writer: vmdk2kvm convert (qcow2 output, 64 KiB clusters) vs qemu-img
# convert -O qcow2 on the same generated disk as monolithicSparse and as
# streamOptimized VMDKs (made by qemu-img), and compressed output (our
# --compress=deflate and zstd vs qemu-img convert -c), with a warm page cache,
# plus our peak RSS and the output sizes. Every output is checked with
# qemu-img check and compare. Targets (issue 4): >=1.5x (monolithicSparse),
# >=2x (streamOptimized), >=10x (compressed), peak RSS <= 256 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
[ -x bin/vmdk2kvm ] || CGO_ENABLED=0 go build -o bin/vmdk2kvm ./cmd/vmdk2kvm
src=$(gen_disk)
ours_out="$BENCH_DIR/qcow2-ours.qcow2"
ref_out="$BENCH_DIR/qcow2-qemu.qcow2"
trap 'rm -f "$ours_out" "$ref_out"' EXIT
BENCH_CLEAN="$ours_out $ref_out"


verify() { # verify OUT SRC
  qemu-img check -q "$1" || { echo "qcow2: qemu-img check failed on $1" >&2; exit 1; }
  qemu-img compare -q "$2" "$1" || { echo "qcow2: $1 differs from $2" >&2; exit 1; }
}
mib() { echo $(( $(stat -c %s "$1") / 1048576 )); }

line() { # line LABEL OURS QEMU OURSIZE QEMUSIZE
  printf 'qcow2 %s %s: vmdk2kvm %ss (peak RSS %d MiB, %s MiB) | qemu-img %ss (%s MiB) | speed ratio %sx (qemu-img time / ours)\n' \
    "$BENCH_SIZE" "$1" "${2% *}" $(( ${2#* } / 1024 )) "$4" "${3% *}" "$5" "$(ratio "${3% *}" "${2% *}")"
}

for sub in monolithicSparse streamOptimized; do
  img="$BENCH_DIR/disk-$BENCH_SIZE-$sub.vmdk"
  [ -s "$img" ] || qemu-img convert -f raw -O vmdk -o subformat=$sub "$src" "$img"
  cat "$img" >/dev/null # warm the page cache for both tools alike
  rm -f "$ours_out" "$ref_out"
  # vmdk2kvm fsyncs its output by default, qemu-img convert does not
  # (cache=unsafe): compare like with like, both ways.
  ours=$(best_of 2 bin/vmdk2kvm convert -O qcow2 "$img" "$ours_out")
  fast=$(best_of 2 bin/vmdk2kvm convert -O qcow2 --no-sync "$img" "$ours_out")
  verify "$ours_out" "$img" # before timed removes it
  osize=$(mib "$ours_out")
  qemu=$(best_of 2 qemu-img convert -f vmdk -O qcow2 "$img" "$ref_out")
  qsync=$(best_of 2 sh -c 'qemu-img convert -f vmdk -O qcow2 "$1" "$2" && sync "$2"' qemu "$img" "$ref_out")
  qsize=$(mib "$ref_out")
  line "$sub -> qcow2 (both unsynced: ours --no-sync)" "$fast" "$qemu" "$osize" "$qsize"
  line "$sub -> qcow2 (both synced: ours default, qemu-img + sync)" "$ours" "$qsync" "$osize" "$qsize"
done

img="$BENCH_DIR/disk-$BENCH_SIZE-monolithicSparse.vmdk"
rm -f "$ref_out"
qemu=$(timed qemu-img convert -c -f vmdk -O qcow2 "$img" "$ref_out")
qsize=$(mib "$ref_out")
for comp in deflate zstd; do
  rm -f "$ours_out"
  ours=$(timed bin/vmdk2kvm convert -O qcow2 --compress=$comp "$img" "$ours_out")
  verify "$ours_out" "$img"
  line "monolithicSparse -> compressed qcow2 (ours $comp, qemu-img -c zlib)" "$ours" "$qemu" "$(mib "$ours_out")" "$qsize"
done
