#!/usr/bin/env bash
# make bench: vmdk2kvm beside the reference tools on the same generated input.
set -euo pipefail
cd "$(dirname "$0")/.."
for b in bench/*.sh; do
  [ -x "$b" ] && "$b"
done
