#!/usr/bin/env bash
# Builds the countersign-agent .ipk for one OpenWrt package architecture from the static musl
# agent (cross/build.sh --musl), the way OpenWrt's own scripts/ipkg-build does (openwrt/openwrt,
# scripts/ipkg-build): a gzipped GNU tar of ./debian-binary ("2.0"), ./data.tar.gz and
# ./control.tar.gz, each tar with --format=gnu --numeric-owner --sort=name and one fixed mtime,
# gzip -n, conffiles reduced to the files that exist, Installed-Size = bytes of the uncompressed
# data tar. ipkg-build runs under fakeroot; here --owner=0 --group=0 gives the same root-owned
# entries. The maintainer scripts follow include/package-ipkg.mk: postinst and prerm are the
# standard stubs calling default_postinst/default_prerm of /lib/functions.sh, the package's
# own steps are in postinst-pkg (see cross/openwrt/).
#
# Contents: /usr/bin/countersign-agent, the procd init script /etc/init.d/countersign-agent,
# /etc/countersign/agent.toml (a conffile; data_dir set for OpenWrt). The user and group
# `countersign` come from the control field Require-User.
#
# Usage: cross/package-ipk.sh --arch OPENWRT_ARCH [--binary PATH] [--version V] [--out DIR]
#                             [--skip-unbuildable]
#   --arch     aarch64_generic | arm_cortex-a7_neon-vfpv4 | x86_64 (the three built in CI), or
#              another name for the same binary: aarch64_cortex-a53, aarch64_cortex-a72
#              (aarch64 musl); arm_cortex-a9_vfpv3-d16, arm_cortex-a15_neon-vfpv4 (armv7 musl)
#   --binary   default: the release-gateway musl build for the arch (cross/build.sh --musl)
#   --version  default: the workspace version from Cargo.toml, with OpenWrt's release "-1"
#   --out      default: <cargo target dir>/ipk
#   --skip-unbuildable  when the binary is missing because this Rust toolchain has no standard
#              library for its target (cross/build.sh skipped it, loudly), say so on stderr and
#              print nothing instead of failing; a binary missing for any other reason fails
# Prints the path of the package. Safe to re-run (the same inputs give the same bytes).
set -euo pipefail
cd "$(dirname "$0")/.."

arch="" binary="" version="" out="" skip_unbuildable=0
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch=${2:?--arch needs an OpenWrt architecture}; shift 2 ;;
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --skip-unbuildable) skip_unbuildable=1; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "package-ipk: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# OpenWrt names a package architecture after the CPU its packages are compiled for; opkg
# installs only architectures listed in the device's /etc/opkg/arch.conf (or opkg.conf). The
# static binaries target the baseline of each family, so one binary serves several names.
case "$arch" in
  aarch64_generic|aarch64_cortex-a53|aarch64_cortex-a72)
    triple=aarch64-unknown-linux-musl machine=AArch64 ;;
  arm_cortex-a7_neon-vfpv4|arm_cortex-a9_vfpv3-d16|arm_cortex-a15_neon-vfpv4)
    triple=armv7-unknown-linux-musleabihf machine=ARM ;;
  x86_64)
    triple=x86_64-unknown-linux-musl machine="Advanced Micro Devices X86-64" ;;
  *) echo "package-ipk: --arch must be aarch64_generic, arm_cortex-a7_neon-vfpv4 or x86_64" \
       "(or aarch64_cortex-a53, aarch64_cortex-a72, arm_cortex-a9_vfpv3-d16, arm_cortex-a15_neon-vfpv4); got '$arch'" >&2
     exit 2 ;;
esac
for tool in tar gzip readelf awk; do
  command -v "$tool" >/dev/null || { echo "package-ipk: $tool is missing" >&2; exit 1; }
done

target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || { echo "package-ipk: cannot find cargo's target directory" >&2; exit 1; }
[ -n "$out" ] || out="$target_dir/ipk"
[ -n "$binary" ] || binary="$target_dir/$triple/release-gateway/countersign-agent"
if [ ! -x "$binary" ] && [ "$skip_unbuildable" -eq 1 ] &&
   [ ! -d "$(rustc --print sysroot)/lib/rustlib/$triple/lib" ]; then
  printf '\n!!! SKIPPED the %s package: this Rust toolchain has no standard library for %s\n' "$arch" "$triple" >&2
  printf '!!! (rustup could not install it; cross/build.sh skipped the build). See cross/README.md.\n' >&2
  exit 0
fi
[ -x "$binary" ] || { echo "package-ipk: $binary not found; build it first (cross/build.sh --musl)" >&2; exit 1; }
got=$(readelf -h "$binary" | sed -n 's/^ *Machine: *//p')
[ "$got" = "$machine" ] || { echo "package-ipk: $binary is for '$got', not $arch ($machine)" >&2; exit 1; }
# OpenWrt's libc is musl, and its loader path differs per target: only a static binary runs
# on all of them.
if readelf -lW "$binary" | grep -q INTERP; then
  echo "package-ipk: $binary is dynamically linked ($(readelf -lW "$binary" | sed -n 's/.*interpreter: \(.*\)\]/\1/p')); the .ipk needs the static musl build" >&2
  exit 1
fi

if [ -z "$version" ]; then
  v=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
  [ -n "$v" ] || { echo "package-ipk: no version in Cargo.toml [workspace.package]" >&2; exit 1; }
  version="$v-1"
fi

# One timestamp for every entry, as ipkg-build (SOURCE_DATE_EPOCH, else the last commit).
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
timestamp="@$epoch"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/pkg"
umask 022
install -d "$pkg/CONTROL" "$pkg/usr/bin" "$pkg/etc/init.d"
install -d -m 0750 "$pkg/etc/countersign"
install -m 0755 "$binary" "$pkg/usr/bin/countersign-agent"
install -m 0755 cross/openwrt/countersign-agent.init "$pkg/etc/init.d/countersign-agent"
# The .deb's default config with the buffer where OpenWrt keeps state that must survive a
# reboot (/var is RAM there); the init script warns when it is on the flash overlay.
sed -e 's|^data_dir = .*|data_dir = "/srv/countersign-agent"|' \
    -e 's|^# The durable buffer (systemd StateDirectory.*|# The durable buffer: on storage that survives reboots and takes writes (a USB, SD or eMMC\n# partition; not /tmp, which is RAM, and preferably not the flash overlay). Kept on removal.|' \
    cross/deb/agent.toml >"$pkg/etc/countersign/agent.toml"
grep -qx 'data_dir = "/srv/countersign-agent"' "$pkg/etc/countersign/agent.toml" ||
  { echo "package-ipk: cross/deb/agent.toml has no top-level data_dir line to set" >&2; exit 1; }
chmod 0640 "$pkg/etc/countersign/agent.toml"

# Maintainer scripts: OpenWrt's generated stubs (include/package-ipkg.mk), then the package's.
cat >"$pkg/CONTROL/postinst" <<'STUB'
#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
STUB
cat >"$pkg/CONTROL/prerm" <<'STUB'
#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_prerm $0 $@
STUB
install -m 0755 cross/openwrt/postinst-pkg "$pkg/CONTROL/postinst-pkg"
install -m 0755 cross/openwrt/postrm "$pkg/CONTROL/postrm"
chmod 0755 "$pkg/CONTROL/postinst" "$pkg/CONTROL/prerm"

# conffiles: as ipkg-build, only the listed files that exist, sorted.
printf '%s\n' /etc/countersign/agent.toml >"$pkg/CONTROL/conffiles"
( cd "$pkg" && while read -r f; do [ -f ".$f" ] && echo "$f"; done <CONTROL/conffiles ) |
  LC_ALL=C sort >"$stage/conffiles"
mv "$stage/conffiles" "$pkg/CONTROL/conffiles"
chmod 0644 "$pkg/CONTROL/conffiles"

license=$(sed -n '/^\[workspace.package\]/,/^\[/s/^license *= *"\(.*\)"/\1/p' Cargo.toml)
# Field order as include/package-ipkg.mk writes it; Installed-Size is filled in below.
cat >"$pkg/CONTROL/control" <<CONTROL
Package: countersign-agent
Version: $version
Depends: procd
Source: cross/package-ipk.sh
SourceName: countersign-agent
License: ${license:-Apache-2.0}
Section: net
SourceDateEpoch: $epoch
URL: https://example.invalid/countersign
Require-User: countersign:countersign
Maintainer: Countersign developers <countersign@example.invalid>
Architecture: $arch
Installed-Size: 0
Description:  Countersign gateway agent: metered SIM usage to the rating endpoint.
 Subscribes to device usage reports on the gateway's MQTT broker, keeps each one
 durably in a local buffer before acknowledging it, and uploads signed batches to
 the rating endpoint. Static musl build, procd init script.
CONTROL
chmod 0644 "$pkg/CONTROL/control"

tars=(--format=gnu --numeric-owner --owner=0 --group=0 --sort=name --mtime="$timestamp")
work="$stage/build"
mkdir "$work"
echo CONTROL >"$work/tarX"
( cd "$pkg" && tar -X "$work/tarX" "${tars[@]}" -cpf - . ) | gzip -n - >"$work/data.tar.gz"
installed_size=$(zcat <"$work/data.tar.gz" | wc -c)
sed -i -e "s/^Installed-Size: .*/Installed-Size: $installed_size/" "$pkg/CONTROL/control"
( cd "$pkg/CONTROL" && tar "${tars[@]}" -cf - . ) | gzip -n - >"$work/control.tar.gz"
echo "2.0" >"$work/debian-binary"

mkdir -p "$out"
ipk="$out/countersign-agent_${version}_${arch}.ipk"
rm -f "$ipk"
( cd "$work" && tar "${tars[@]}" -cf - ./debian-binary ./data.tar.gz ./control.tar.gz ) | gzip -n - >"$ipk"
echo "$ipk"
