#!/usr/bin/env bash
# VMDK reader: vmdk2kvm convert -O raw vs qemu-img convert -O raw on the same
# generated disk as monolithicSparse and as streamOptimized (both made by
# qemu-img), with a warm page cache, plus our peak RSS. Targets (issue 3):
# >=1.3x on monolithicSparse, >=1.8x on streamOptimized, RSS <=256 MiB.
#
# The tools run interleaved (ours, qemu-img, qemu-img+sync; three rounds) and
# the best time of each is kept, so a machine whose load changes during the
# run biases neither side. CPU seconds (user+sys) are printed too: the wall
# time gain of our parallel reader needs idle cores, the CPU time does not.
# vmdk2kvm fsyncs its output before renaming it into place; qemu-img convert
# does not fsync at all (cache=unsafe). Like is compared with like: ours with
# --no-sync against plain qemu-img, and ours by default against qemu-img
# followed by `sync FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
src=$(gen_disk)
out="$BENCH_DIR/vmdk-out.raw"

# t CMD...: runs CMD, prints "SECONDS MAXRSS_KIB CPU_SECONDS".
t() {
  local f
  sync # untimed: no run pays for the previous run's writeback
  f=$(mktemp)
  /usr/bin/time -f '%e %M %U %S' -o "$f" "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; cat "$f" >&2; rm -f "$f"; return 1; }
  tail -1 "$f" | awk '{printf "%s %s %.2f\n", $1, $2, $3+$4}'
  rm -f "$f"
}
# better A B: the line with the smaller first field.
better() { if [ -z "$1" ] || awk -v a="${2%% *}" -v b="${1%% *}" 'BEGIN{exit !(a<b)}'; then echo "$2"; else echo "$1"; fi; }
field() { echo "$1" | cut -d' ' -f"$2"; }

for sub in monolithicSparse streamOptimized; do
  img="$BENCH_DIR/disk-$BENCH_SIZE-$sub.vmdk"
  [ -s "$img" ] || qemu-img convert -f raw -O vmdk -o subformat=$sub "$src" "$img"
  cat "$img" >/dev/null # warm the page cache for both tools alike
  ours="" fast="" qemu="" qsync=""
  load0=$(cut -d' ' -f1 /proc/loadavg)
  for _ in 1 2 3; do
    ours=$(better "$ours" "$(t bin/vmdk2kvm convert -O raw "$img" "$out")")
    qemu-img compare -f raw -F vmdk "$out" "$img" >/dev/null || { echo "vmdk $sub: our output differs from the image" >&2; exit 1; }
    rm -f "$out"
    fast=$(better "$fast" "$(t bin/vmdk2kvm convert -O raw --no-sync "$img" "$out")")
    rm -f "$out"
    qemu=$(better "$qemu" "$(t qemu-img convert -f vmdk -O raw "$img" "$out")")
    rm -f "$out"
    qsync=$(better "$qsync" "$(t sh -c 'qemu-img convert -f vmdk -O raw "$1" "$2" && sync "$2"' qemu "$img" "$out")")
    rm -f "$out"
  done
  load1=$(cut -d' ' -f1 /proc/loadavg)
  printf 'vmdk %s %s -> raw, both unsynced: vmdk2kvm --no-sync %ss (%s CPU-s, peak RSS %d MiB) | qemu-img %ss (%s CPU-s) | speed ratio %sx (qemu-img time / ours)\n' \
    "$BENCH_SIZE" "$sub" "$(field "$fast" 1)" "$(field "$fast" 3)" $(( $(field "$fast" 2) / 1024 )) \
    "$(field "$qemu" 1)" "$(field "$qemu" 3)" "$(ratio "$(field "$qemu" 1)" "$(field "$fast" 1)")"
  printf 'vmdk %s %s -> raw, both synced: vmdk2kvm %ss (%s CPU-s, peak RSS %d MiB) | qemu-img + sync %ss | speed ratio %sx | load average %s -> %s on %s cores\n' \
    "$BENCH_SIZE" "$sub" "$(field "$ours" 1)" "$(field "$ours" 3)" $(( $(field "$ours" 2) / 1024 )) \
    "$(field "$qsync" 1)" "$(ratio "$(field "$qsync" 1)" "$(field "$ours" 1)")" "$load0" "$load1" "$(nproc)"
done
