#!/usr/bin/env bash
# Builds Countersign for the devices it runs on, without Docker:
#   - countersign-agent for aarch64-unknown-linux-gnu and armv7-unknown-linux-gnueabihf
#     (ARM Linux gateways), profile `release-gateway` (size-tuned, see Cargo.toml);
#   - the firmware crate countersign-meter for thumbv7em-none-eabihf (Cortex-M4/M7), release.
# Installs what is missing first: the rustup targets and the Debian cross toolchains
# (gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross
# qemu-user). Linkers, runners and the per-target C compilers ring needs come from
# .cargo/config.toml; this script never exports a global CC.
#
# Usage: cross/build.sh [--profile NAME] [--target TRIPLE]... [--host] [--no-firmware] [--musl]
#   --profile NAME   cargo profile for the agent (default: release-gateway)
#   --target TRIPLE  build the agent only for this gateway triple (repeatable; default: both)
#   --host           also build the agent for this machine (amd64 .deb), same profile
#   --no-firmware    skip the thumbv7em firmware build
#   --musl           also try aarch64-unknown-linux-musl (static; see cross/README.md)
# Safe to run again. Prints each artifact with its size and glibc floor.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release-gateway
targets=()
firmware=1
musl=0
host=0
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?--profile needs a name}; shift 2 ;;
    --target) targets+=("${2:?--target needs a triple}"); shift 2 ;;
    --host) host=1; shift ;;
    --no-firmware) firmware=0; shift ;;
    --musl) musl=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "cross/build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
for t in "${targets[@]}"; do
  case "$t" in
    aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf) ;;
    *) echo "cross/build.sh: unsupported gateway target '$t' (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf)" >&2; exit 2 ;;
  esac
done

step() { printf '\n== cross: %s ==\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# A global CC would make ring's build script compile ARM code with it (usually the host gcc).
if [ -n "${CC:-}" ]; then
  echo "note: ignoring the global CC=$CC for cross builds (per-target CC_<triple> come from .cargo/config.toml)"
  unset CC
fi

# What each gateway triple needs from Debian: the cross gcc (linker and C compiler for ring),
# its libc, and the QEMU user emulator that runs the result.
need_pkgs() {
  case "$1" in
    aarch64-unknown-linux-gnu)
      command -v aarch64-linux-gnu-gcc >/dev/null || echo gcc-aarch64-linux-gnu
      [ -e /usr/aarch64-linux-gnu/lib/libc.so ] || echo libc6-dev-arm64-cross
      command -v qemu-aarch64 >/dev/null || echo qemu-user
      ;;
    armv7-unknown-linux-gnueabihf)
      command -v arm-linux-gnueabihf-gcc >/dev/null || echo gcc-arm-linux-gnueabihf
      [ -e /usr/arm-linux-gnueabihf/lib/libc.so ] || echo libc6-dev-armhf-cross
      command -v qemu-arm >/dev/null || echo qemu-user
      ;;
    aarch64-unknown-linux-musl)
      command -v aarch64-linux-gnu-gcc >/dev/null || echo gcc-aarch64-linux-gnu
      ;;
  esac
}

step "Debian cross toolchains"
all=("${targets[@]}")
[ "$musl" -eq 0 ] || all+=(aarch64-unknown-linux-musl)
mapfile -t missing < <(for t in "${all[@]}"; do need_pkgs "$t"; done | sort -u)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  mapfile -t still < <(for t in "${all[@]}"; do need_pkgs "$t"; done | sort -u)
  if [ ${#still[@]} -gt 0 ]; then
    echo "cross/build.sh: still missing after apt-get install: ${still[*]}" >&2; exit 1
  fi
else
  echo "all present"
fi

step "rustup targets"
installed=$(rustup target list --installed)
wanted=("${all[@]}")
[ "$firmware" -eq 0 ] || wanted+=(thumbv7em-none-eabihf)
for t in "${wanted[@]}"; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done
echo "${wanted[*]}"

target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || { echo "cross/build.sh: cannot find cargo's target directory" >&2; exit 1; }

# The highest GLIBC_x.y symbol version a dynamic binary needs: the oldest glibc it runs on.
glibc_floor() {
  readelf --dyn-syms -W "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -u -V | tail -n 1
}

step "agent (profile $profile): ${targets[*]}"
target_args=()
for t in "${targets[@]}"; do target_args+=(--target "$t"); done
cargo build --locked -p countersign-agent --bin countersign-agent --profile "$profile" "${target_args[@]}"

bins=()
for t in "${targets[@]}"; do bins+=("$target_dir/$t/$profile/countersign-agent"); done
if [ "$host" -eq 1 ]; then
  step "agent (profile $profile): this machine"
  cargo build --locked -p countersign-agent --bin countersign-agent --profile "$profile"
  bins+=("$target_dir/$profile/countersign-agent")
fi

step "artifacts"
for bin in "${bins[@]}"; do
  [ -x "$bin" ] || { echo "cross/build.sh: expected $bin after the build" >&2; exit 1; }
  printf '%s\n  %s bytes, needs glibc >= %s\n' "$bin" "$(stat -c %s "$bin")" "$(glibc_floor "$bin" | sed 's/GLIBC_//')"
done

if [ "$firmware" -eq 1 ]; then
  step "firmware: countersign-meter for thumbv7em-none-eabihf (release)"
  cargo build --locked -p countersign-meter --target thumbv7em-none-eabihf --release
  ls -l "$target_dir"/thumbv7em-none-eabihf/release/libcountersign_meter.rlib
fi

if [ "$musl" -eq 1 ]; then
  step "experimental: aarch64-unknown-linux-musl (static)"
  # Debian ships no aarch64 musl cross gcc. Rust's musl targets bring their own musl libc and
  # start files (self-contained linking), so the glibc cross gcc serves as the linker driver
  # and compiles ring's freestanding C and assembly.
  if CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc \
     CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc \
     AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar \
     CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER=qemu-aarch64 \
     cargo build --locked -p countersign-agent --bin countersign-agent --profile "$profile" \
       --target aarch64-unknown-linux-musl; then
    bin="$target_dir/aarch64-unknown-linux-musl/$profile/countersign-agent"
    printf '%s\n  %s bytes, %s\n' "$bin" "$(stat -c %s "$bin")" \
      "$(readelf -l "$bin" | grep -q INTERP && echo 'dynamic (unexpected)' || echo 'static, no glibc needed')"
  else
    echo "the musl build failed (see above); the glibc builds are unaffected" >&2
    exit 1
  fi
fi
