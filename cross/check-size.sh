#!/usr/bin/env bash
# Fails when a stripped gateway binary exceeds its size budget (default 4 MiB), printing its
# size either way. The binary is stripped into a temporary copy with the strip of its own
# architecture, so the check holds whether or not the profile already strips.
#
# Usage: cross/check-size.sh BINARY [BUDGET_BYTES]
set -euo pipefail

bin=${1:?usage: cross/check-size.sh BINARY [BUDGET_BYTES]}
budget=${2:-$((4 * 1024 * 1024))}
[ -f "$bin" ] || { echo "check-size: $bin does not exist (build it with cross/build.sh)" >&2; exit 1; }

machine=$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')
case "$machine" in
  AArch64) strip=aarch64-linux-gnu-strip ;;
  ARM) strip=arm-linux-gnueabihf-strip ;;
  *X86-64*) strip="strip" ;;
  *) echo "check-size: unexpected ELF machine '$machine' for $bin" >&2; exit 1 ;;
esac
command -v "$strip" >/dev/null || { echo "check-size: $strip is missing (binutils for $machine; cross/build.sh installs it)" >&2; exit 1; }

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$strip" -o "$tmp" "$bin"
size=$(stat -c %s "$tmp")
mib=$(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }')
budget_mib=$(awk -v s="$budget" 'BEGIN { printf "%.2f", s / 1048576 }')
if [ "$size" -gt "$budget" ]; then
  echo "SIZE BUDGET EXCEEDED: $bin stripped is $size bytes ($mib MiB) > budget $budget bytes ($budget_mib MiB)" >&2
  exit 1
fi
echo "size ok: $bin stripped is $size bytes ($mib MiB), budget $budget bytes ($budget_mib MiB)"
