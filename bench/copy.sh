#!/usr/bin/env bash
# Copy engine: vmdk2kvm convert raw->raw vs qemu-img convert -O raw on the
# same generated disk (best of 3, warm page cache), with our peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
src=$(gen_disk)
out="$BENCH_DIR/copy-out.raw"
BENCH_CLEAN=$out
cat "$src" >/dev/null # warm the page cache for both tools alike
ours=$(best_of 3 bin/vmdk2kvm convert -O raw "$src" "$out")
fast=$(best_of 3 bin/vmdk2kvm convert -O raw --no-sync "$src" "$out")
qemu-img compare -f raw -F raw "$src" "$out" >/dev/null || { echo "copy: our output differs from the disk" >&2; exit 1; }
qemu=$(best_of 3 qemu-img convert -f raw -O raw "$src" "$out")
# vmdk2kvm fsyncs its output before renaming it into place; qemu-img leaves
# it in the page cache. The second ratio gives qemu-img the same durability.
qsync=$(best_of 3 sh -c "qemu-img convert -f raw -O raw '$src' '$out' && sync '$out'")
rm -f "$out"
printf 'copy %s raw->raw, both unsynced: vmdk2kvm --no-sync %ss (peak RSS %d MiB) | qemu-img %ss | speed ratio %sx (qemu-img time / ours)\n' \
  "$BENCH_SIZE" "${fast% *}" $(( ${fast#* } / 1024 )) "${qemu% *}" "$(ratio "${qemu% *}" "${fast% *}")"
printf 'copy %s raw->raw, both synced: vmdk2kvm %ss (peak RSS %d MiB) | qemu-img + sync %ss | speed ratio %sx\n' \
  "$BENCH_SIZE" "${ours% *}" $(( ${ours#* } / 1024 )) "${qsync% *}" "$(ratio "${qsync% *}" "${ours% *}")"
