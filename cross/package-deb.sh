#!/usr/bin/env bash
# Builds the countersign-agent .deb for one Debian architecture with dpkg-deb (no other
# tooling): the binary, a hardened systemd unit, the default config /etc/countersign/agent.toml
# (a conffile), and maintainer scripts that create the `countersign` system user and the
# state directory /var/lib/countersign-agent and keep the buffered data on upgrade and remove.
#
# Usage: cross/package-deb.sh --arch amd64|arm64|armhf [--binary PATH] [--version V] [--out DIR]
#   --binary   default: the release-gateway build for the arch (cross/build.sh; for amd64:
#              cargo build -p countersign-agent --profile release-gateway)
#   --version  default: the workspace version from Cargo.toml
#   --out      default: target/deb
# Prints the path of the package.
set -euo pipefail
cd "$(dirname "$0")/.."

arch="" binary="" version="" out=target/deb
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch=${2:?--arch needs amd64, arm64 or armhf}; shift 2 ;;
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "package-deb: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

case "$arch" in
  amd64) triple="" machine="Advanced Micro Devices X86-64" ;;
  arm64) triple=aarch64-unknown-linux-gnu machine=AArch64 ;;
  armhf) triple=armv7-unknown-linux-gnueabihf machine=ARM ;;
  *) echo "package-deb: --arch must be amd64, arm64 or armhf (got '$arch')" >&2; exit 2 ;;
esac
for tool in dpkg-deb readelf; do
  command -v "$tool" >/dev/null || { echo "package-deb: $tool is missing (apt-get install dpkg-dev binutils)" >&2; exit 1; }
done

if [ -z "$binary" ]; then
  binary=target/${triple:+$triple/}release-gateway/countersign-agent
fi
[ -x "$binary" ] || { echo "package-deb: $binary not found; build it first (cross/build.sh)" >&2; exit 1; }
# Refuse a binary for another architecture: it would install and then fail to start.
got=$(readelf -h "$binary" | sed -n 's/^ *Machine: *//p')
[ "$got" = "$machine" ] || { echo "package-deb: $binary is for '$got', not $arch ($machine)" >&2; exit 1; }

if [ -z "$version" ]; then
  version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
  [ -n "$version" ] || { echo "package-deb: no version in Cargo.toml [workspace.package]" >&2; exit 1; }
fi

# The oldest glibc the binary runs on becomes the libc6 dependency.
glibc=$(readelf --dyn-syms -W "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -u -V | tail -n 1)
if [ -n "$glibc" ]; then depends="libc6 (>= $glibc), passwd"; else depends="passwd"; fi

stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
umask 022
install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/countersign" \
  "$stage/usr/share/doc/countersign-agent"
install -m 0755 "$binary" "$stage/usr/bin/countersign-agent"
install -m 0644 cross/deb/countersign-agent.service "$stage/lib/systemd/system/countersign-agent.service"
install -m 0640 cross/deb/agent.toml "$stage/etc/countersign/agent.toml"
install -m 0644 cross/README.md "$stage/usr/share/doc/countersign-agent/README.md"
install -m 0644 cross/deb/copyright "$stage/usr/share/doc/countersign-agent/copyright"
for s in postinst prerm postrm; do install -m 0755 "cross/deb/$s" "$stage/DEBIAN/$s"; done
echo /etc/countersign/agent.toml > "$stage/DEBIAN/conffiles"
chmod 0644 "$stage/DEBIAN/conffiles"

installed_kib=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: countersign-agent
Version: $version
Architecture: $arch
Maintainer: Countersign developers <countersign@example.invalid>
Depends: $depends
Section: net
Priority: optional
Installed-Size: $installed_kib
Homepage: https://example.invalid/countersign
Description: Countersign gateway agent: metered SIM usage to the rating endpoint
 Subscribes to device usage reports on the gateway's MQTT broker, keeps each one
 durably in a local buffer before acknowledging it, and uploads signed batches to
 the rating endpoint, deleting them only once the endpoint has answered.
CONTROL

mkdir -p "$out"
deb="$out/countersign-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
