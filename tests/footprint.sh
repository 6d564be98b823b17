#!/usr/bin/env bash
# Footprint of the firmware on thumbv7em-none-eabihf (release: opt-level s, fat LTO), checked
# against the budgets: the meter core (counter, policy, report encoding + HMAC tag, Quectel
# driver, plus cortex-m-rt start-up), as the `footprint-core` image, must stay within
# FLASH_BUDGET_BYTES of flash (text + data) and RAM_BUDGET_BYTES of static RAM (data + bss).
# Prints text/data/bss of the whole board image too. Needs binutils' `size` (reads ARM ELF).
set -euo pipefail
cd "$(dirname "$0")/../firmware/boards/mps2-an386"

FLASH_BUDGET_BYTES=$((12 * 1024))
RAM_BUDGET_BYTES=1024

# A throwaway key: the figures do not depend on it, and no image built here is shipped.
COUNTERSIGN_METER_ID=1 COUNTERSIGN_METER_KEY=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n') \
  cargo build --release --quiet --bins

out=target/thumbv7em-none-eabihf/release
size "$out/footprint-core" "$out/countersign-meter-fw"
read -r text data bss _ < <(size "$out/footprint-core" | awk 'NR==2 {print $1, $2, $3}')
flash=$((text + data))
ram=$((data + bss))
echo "meter core: flash ${flash} B (budget ${FLASH_BUDGET_BYTES}), static RAM ${ram} B (budget ${RAM_BUDGET_BYTES})"
[ "$flash" -le "$FLASH_BUDGET_BYTES" ] || { echo "meter core flash over budget"; exit 1; }
[ "$ram" -le "$RAM_BUDGET_BYTES" ] || { echo "meter core static RAM over budget"; exit 1; }
