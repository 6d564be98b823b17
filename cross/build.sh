#!/usr/bin/env bash
# Builds Countersign for the devices it runs on, without Docker:
#   - countersign-agent for aarch64-unknown-linux-gnu and armv7-unknown-linux-gnueabihf
#     (ARM Linux gateways), profile `release-gateway` (size-tuned, see Cargo.toml);
#   - with --musl, the same agent static for aarch64-unknown-linux-musl,
#     armv7-unknown-linux-musleabihf and x86_64-unknown-linux-musl (OpenWrt-class gateways,
#     the .ipk packages, any Linux whatever its libc);
#   - the firmware crate countersign-meter for thumbv7em-none-eabihf (Cortex-M4/M7), release.
# Installs what is missing first: the rustup targets and the Debian cross toolchains
# (gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross
# qemu-user, and musl-tools for x86_64 musl). Linkers, runners and the per-target C compilers
# ring needs come from .cargo/config.toml; this script never exports a global CC.
#
# Usage: cross/build.sh [--profile NAME] [--target TRIPLE]... [--host] [--no-firmware] [--musl]
#   --profile NAME   cargo profile for the agent (default: release-gateway)
#   --target TRIPLE  build the agent only for this triple (repeatable; default: the two gnu
#                    gateway triples); any of the gnu or musl triples above
#   --host           also build the agent for this machine (amd64 .deb), same profile
#   --no-firmware    skip the thumbv7em firmware build
#   --musl           also build the three static musl agents (checked: no PT_INTERP)
# Safe to run again. Prints each artifact with its size and glibc floor (or "static").
# A musl triple whose Rust standard library the rustup distribution server does not offer
# for the active toolchain is built with the fallback toolchain
# $COUNTERSIGN_MUSL_FALLBACK_TOOLCHAIN (default 1.93.0, the newest whose armv7 musl std this
# machine's rustup mirror serves; installed with --profile minimal) and skipped with a loud
# message only when that fails too (see cross/README.md); every other failure fails.
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
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "cross/build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
musl_triples=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf x86_64-unknown-linux-musl)
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
[ "$musl" -eq 0 ] || targets+=("${musl_triples[@]}")
mapfile -t targets < <(printf '%s\n' "${targets[@]}" | awk '!seen[$0]++')
for t in "${targets[@]}"; do
  case "$t" in
    aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf) ;;
    aarch64-unknown-linux-musl|armv7-unknown-linux-musleabihf|x86_64-unknown-linux-musl) ;;
    *) echo "cross/build.sh: unsupported gateway target '$t' (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf, ${musl_triples[*]})" >&2; exit 2 ;;
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
    # Static musl: the gcc of the architecture drives the link and compiles ring; musl's
    # libc.a and start files come with the rustup target (self-contained linking).
    aarch64-unknown-linux-musl)
      command -v aarch64-linux-gnu-gcc >/dev/null || echo gcc-aarch64-linux-gnu
      command -v qemu-aarch64 >/dev/null || echo qemu-user
      ;;
    armv7-unknown-linux-musleabihf)
      command -v arm-linux-gnueabihf-gcc >/dev/null || echo gcc-arm-linux-gnueabihf
      command -v qemu-arm >/dev/null || echo qemu-user
      ;;
    x86_64-unknown-linux-musl)
      command -v musl-gcc >/dev/null || echo musl-tools
      ;;
  esac
}

step "Debian cross toolchains"
all=("${targets[@]}")
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
unavailable=()
for t in "${wanted[@]}"; do
  grep -qx "$t" <<<"$installed" && continue
  if ! out=$(rustup target add "$t" 2>&1); then
    # A musl target whose standard library the distribution server does not offer (rustup
    # gets a 404, or the channel manifest marks it unavailable) cannot be built with this
    # toolchain: skipped loudly. Anything else fails the build.
    case "$t" in *-musl*)
      if grep -Eqi '404|unavailable|not available|not installable|component download failed' <<<"$out"; then
        unavailable+=("$t"); continue
      fi ;;
    esac
    echo "$out" >&2
    echo "cross/build.sh: rustup target add $t failed" >&2; exit 1
  fi
done
# The unavailable ones through the fallback toolchain, when it can have them.
fallback=${COUNTERSIGN_MUSL_FALLBACK_TOOLCHAIN:-1.93.0}
fallback_targets=()
still_unavailable=()
for t in "${unavailable[@]}"; do
  if rustup toolchain install "$fallback" --profile minimal --target "$t" >/dev/null 2>&1 ||
    rustup target add --toolchain "$fallback" "$t" >/dev/null 2>&1; then
    printf '\n!!! %s: no rust-std for the active toolchain here; built with rust %s instead\n' "$t" "$fallback" >&2
    fallback_targets+=("$t")
  else
    still_unavailable+=("$t")
  fi
done
unavailable=("${still_unavailable[@]}")
if [ ${#unavailable[@]} -gt 0 ]; then
  for t in "${unavailable[@]}"; do
    printf '\n!!! SKIPPED %s: rustup cannot install its standard library here\n' "$t" >&2
    printf '!!! (%s has no rust-std for it); the other targets are built.\n' \
      "$(rustup show active-toolchain | cut -d' ' -f1)" >&2
  done
fi
if [ $(( ${#unavailable[@]} + ${#fallback_targets[@]} )) -gt 0 ]; then
  mapfile -t targets < <(printf '%s\n' "${targets[@]}" |
    grep -vxF -f <(printf '%s\n' "${unavailable[@]}" "${fallback_targets[@]}") || true)
fi
{ printf '%s\n' "${wanted[@]}" | grep -vxF -f <(printf '%s\n' "${unavailable[@]:-}") || true; } | tr '\n' ' '
echo

target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || { echo "cross/build.sh: cannot find cargo's target directory" >&2; exit 1; }

# The highest GLIBC_x.y symbol version a dynamic binary needs: the oldest glibc it runs on.
glibc_floor() {
  readelf --dyn-syms -W "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -u -V | tail -n 1
}

# One cargo invocation for every triple: build scripts and proc macros are built once, and
# the targets' crates compile side by side.
if [ ${#targets[@]} -gt 0 ]; then
  step "agent (profile $profile): ${targets[*]}"
  target_args=()
  for t in "${targets[@]}"; do target_args+=(--target "$t"); done
  cargo build --locked -p countersign-agent --bin countersign-agent --profile "$profile" "${target_args[@]}"
fi

for t in "${fallback_targets[@]}"; do
  step "agent (profile $profile, rust $fallback): $t"
  cargo "+$fallback" build --locked -p countersign-agent --bin countersign-agent --profile "$profile" --target "$t"
done

bins=()
for t in "${targets[@]}" "${fallback_targets[@]}"; do bins+=("$target_dir/$t/$profile/countersign-agent"); done
if [ "$host" -eq 1 ]; then
  step "agent (profile $profile): this machine"
  cargo build --locked -p countersign-agent --bin countersign-agent --profile "$profile"
  bins+=("$target_dir/$profile/countersign-agent")
fi

step "artifacts"
for bin in "${bins[@]}"; do
  [ -x "$bin" ] || { echo "cross/build.sh: expected $bin after the build" >&2; exit 1; }
  rel=${bin#"$target_dir"/}
  case "${rel%%/*}" in
    *-musl*)
      # Static: no program interpreter, no dynamic section, so no libc needed on the gateway.
      if readelf -lW "$bin" | grep -q 'INTERP' || readelf -dW "$bin" | grep -q 'NEEDED'; then
        echo "cross/build.sh: $bin is not static:" >&2; readelf -lW "$bin" | grep -A1 INTERP >&2; exit 1
      fi
      printf '%s\n  %s bytes, static (no PT_INTERP, no NEEDED), %s\n' "$bin" "$(stat -c %s "$bin")" \
        "$(readelf -hW "$bin" | sed -n 's/^ *Type: *\([A-Z]*\).*/\1/p' | sed 's/DYN/static-pie/; s/EXEC/static executable/')"
      ;;
    *) printf '%s\n  %s bytes, needs glibc >= %s\n' "$bin" "$(stat -c %s "$bin")" "$(glibc_floor "$bin" | sed 's/GLIBC_//')" ;;
  esac
done

if [ "$firmware" -eq 1 ]; then
  step "firmware: countersign-meter for thumbv7em-none-eabihf (release)"
  cargo build --locked -p countersign-meter --target thumbv7em-none-eabihf --release
  ls -l "$target_dir"/thumbv7em-none-eabihf/release/libcountersign_meter.rlib
fi
