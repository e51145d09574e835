#!/usr/bin/env bash
# VMDK reader: vmdk2kvm convert -O raw vs qemu-img convert -O raw on the same
# generated disk as monolithicSparse and as streamOptimized (both made by
# qemu-img), best of 3 with a warm page cache, plus our peak RSS. Targets
# (issue 3): >=1.3x on monolithicSparse, >=1.8x on streamOptimized, RSS <=256 MiB.
#
# vmdk2kvm fsyncs its output before renaming it into place; qemu-img convert
# does not fsync at all. Both ratios are printed: against plain qemu-img, and
# against qemu-img followed by `sync FILE` (the same durability as ours).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
src=$(gen_disk)
out="$BENCH_DIR/vmdk-out.raw"
for sub in monolithicSparse streamOptimized; do
  img="$BENCH_DIR/disk-$BENCH_SIZE-$sub.vmdk"
  [ -s "$img" ] || qemu-img convert -f raw -O vmdk -o subformat=$sub "$src" "$img"
  cat "$img" >/dev/null # warm the page cache for both tools alike
  ours=$(best_of 3 bin/vmdk2kvm convert -O raw "$img" "$out")
  qemu-img compare -f raw -F vmdk "$out" "$img" >/dev/null || { echo "vmdk $sub: our output differs from the image" >&2; exit 1; }
  rm -f "$out"
  qemu=$(best_of 3 qemu-img convert -f vmdk -O raw "$img" "$out")
  rm -f "$out"
  qsync=$(best_of 3 sh -c 'qemu-img convert -f vmdk -O raw "$1" "$2" && sync "$2"' qemu "$img" "$out")
  rm -f "$out"
  printf 'vmdk %s %s -> raw: vmdk2kvm %ss (peak RSS %d MiB) | qemu-img %ss, %ss with sync | speed ratio %sx (qemu-img time / ours), %sx against qemu-img+sync\n' \
    "$BENCH_SIZE" "$sub" "${ours% *}" $(( ${ours#* } / 1024 )) "${qemu% *}" "${qsync% *}" \
    "$(ratio "${qemu% *}" "${ours% *}")" "$(ratio "${qsync% *}" "${ours% *}")"
done
