#!/usr/bin/env bash
# Checks countersign-agent .deb packages, then installs each for real into an isolated root.
#
# For every package: control fields (Depends on a libc6 floor, conffiles), the file list with
# owners and modes, the binary's architecture, the systemd unit's hardening, and shellcheck
# on the maintainer scripts.
# Then each package for real: dpkg --root=<tmp> --force-script-chrootless into an empty root
# with its own dpkg database (multiarch for arm64/armhf, whose binary runs under QEMU) and
# /etc/passwd: fresh install (system user, state directory, permissions, the installed binary
# creates a real sled database as that user), reinstall (idempotent), upgrade to a newer
# version (data, uid and a locally edited conffile kept), remove (data and config kept),
# purge (data deleted, and said so; user kept). The host's own users are never touched.
#
# Usage: cross/check-deb.sh DEB...      (as root: dpkg --root needs to chown)
set -euo pipefail

[ $# -gt 0 ] || { echo "usage: cross/check-deb.sh DEB..." >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "check-deb: run as root (dpkg --root installs files owned by other users)" >&2; exit 1; }
for tool in dpkg dpkg-deb readelf setpriv awk sha256sum systemd-analyze; do
  command -v "$tool" >/dev/null || { echo "check-deb: $tool is missing" >&2; exit 1; }
done

fail() { echo "check-deb: FAIL: $*" >&2; exit 1; }
ok() { echo "  ok: $*"; }

# Highest overall exposure `systemd-analyze security` may give the unit, in tenths (2.0 is
# well inside systemd's "OK" band; the unit scores 1.5 on systemd 252).
UNIT_EXPOSURE_MAX_TENTHS=20

# systemd's own checks of a unit whose binary is `bin`: `verify` must print nothing at all (it
# exits 0 on unknown keys and bad values, only warning), and the offline `security` exposure
# must stay at most UNIT_EXPOSURE_MAX_TENTHS. The ExecStart paths are pointed at the package's
# own binary, so verify also checks that it is there and executable.
check_unit() {
  local unit=$1 bin=$2 dir out
  dir=$(mktemp -d -p "$work")
  sed "s#/usr/bin/countersign-agent#$bin#g" "$unit" > "$dir/countersign-agent.service"
  out=$(systemd-analyze verify --man=no "$dir/countersign-agent.service" 2>&1) ||
    fail "systemd-analyze verify: $out"
  [ -z "$out" ] || fail "systemd-analyze verify warns: $out"
  # The check itself must see a misspelled directive, on whatever systemd this runs.
  sed 's/^NoNewPrivileges=/NoNewPrivilegs=/' "$dir/countersign-agent.service" > "$dir/typo.service"
  [ -n "$(systemd-analyze verify --man=no "$dir/typo.service" 2>&1)" ] ||
    fail "systemd-analyze verify did not report a misspelled directive; the unit check is blind"
  ok "unit: systemd-analyze verify prints nothing (every directive known and valid, binary executable)"
  out=$(systemd-analyze security --offline=true --threshold="$UNIT_EXPOSURE_MAX_TENTHS" \
    "$dir/countersign-agent.service" 2>&1) ||
    fail "systemd-analyze security: exposure above $UNIT_EXPOSURE_MAX_TENTHS/10: $(echo "$out" | tail -n 1)"
  ok "unit: exposure $(echo "$out" | sed -n 's/^.*Overall exposure level for [^:]*: \([0-9.]* [A-Z]*\).*/\1/p' | tail -n 1) (systemd-analyze security, at most $UNIT_EXPOSURE_MAX_TENTHS/10)"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
host_arch=$(dpkg --print-architecture)

# ---------------------------------------------------------------------------------------------
# Static checks of each package.
for deb in "$@"; do
  [ -f "$deb" ] || fail "$deb does not exist (build it with cross/package-deb.sh)"
  echo "== $deb =="
  field() { dpkg-deb -f "$deb" "$1"; }
  [ "$(field Package)" = countersign-agent ] || fail "Package is '$(field Package)'"
  arch=$(field Architecture)
  case "$arch" in
    amd64) machine="Advanced Micro Devices X86-64" ;;
    arm64) machine=AArch64 ;;
    armhf) machine=ARM ;;
    *) fail "unexpected Architecture '$arch'" ;;
  esac
  field Depends | grep -Eq '(^|, )libc6 \(>= 2\.[0-9]+\)' || fail "Depends lacks a libc6 floor: $(field Depends)"
  ok "control: $(field Package) $(field Version) $arch, Depends: $(field Depends)"

  dpkg-deb -I "$deb" conffiles | grep -qx /etc/countersign/agent.toml || fail "agent.toml is not a conffile"
  ok "conffiles: /etc/countersign/agent.toml"

  list=$(dpkg-deb -c "$deb" | awk '{ print $1, $2, $6 }')
  for want in \
    "-rwxr-xr-x root/root ./usr/bin/countersign-agent" \
    "-rw-r--r-- root/root ./lib/systemd/system/countersign-agent.service" \
    "-rw-r----- root/root ./etc/countersign/agent.toml" \
    "-rw-r--r-- root/root ./usr/share/doc/countersign-agent/copyright" \
    "-rw-r--r-- root/root ./usr/share/doc/countersign-agent/README.md" \
    "drwxr-xr-x root/root ./"; do
    grep -qxF -- "$want" <<<"$list" || fail "missing or wrong mode/owner: '$want' in:"$'\n'"$list"
  done
  # The buffer is created by postinst, never shipped: dpkg must not own (or try to remove) it.
  ! grep -q 'var/lib' <<<"$list" || fail "the package ships files under /var/lib"
  ok "contents: binary 0755, unit, conffile 0640, docs; nothing under /var/lib"

  x="$work/x-$arch"
  dpkg-deb -x "$deb" "$x"
  dpkg-deb -e "$deb" "$x/DEBIAN"
  got=$(readelf -h "$x/usr/bin/countersign-agent" | sed -n 's/^ *Machine: *//p')
  [ "$got" = "$machine" ] || fail "binary is for '$got', package says $arch"
  ok "binary architecture: $got"

  unit="$x/lib/systemd/system/countersign-agent.service"
  for d in User=countersign Group=countersign StateDirectory=countersign-agent \
    ReadWritePaths=/var/lib/countersign-agent ProtectSystem=strict Restart=on-failure \
    NoNewPrivileges=yes PrivateTmp=yes ProtectHome=yes; do
    grep -qx "$d" "$unit" || fail "unit lacks $d"
  done
  grep -Eqx 'RestartSec=[0-9]+s?' "$unit" || fail "unit lacks RestartSec"
  ! grep -q '^DynamicUser=yes' "$unit" || fail "unit uses DynamicUser"
  ok "unit: dedicated user, StateDirectory, ProtectSystem=strict, ReadWritePaths, Restart=on-failure + RestartSec"
  check_unit "$unit" "$x/usr/bin/countersign-agent"

  for s in postinst prerm postrm; do
    [ -x "$x/DEBIAN/$s" ] || fail "maintainer script $s missing or not executable"
    head -n 1 "$x/DEBIAN/$s" | grep -qx '#!/bin/sh' || fail "$s is not a /bin/sh script"
    sh -n "$x/DEBIAN/$s" || fail "$s has a syntax error"
  done
  if command -v shellcheck >/dev/null; then
    shellcheck -s sh "$x/DEBIAN/postinst" "$x/DEBIAN/prerm" "$x/DEBIAN/postrm" || fail "shellcheck"
    ok "maintainer scripts: sh -n and shellcheck clean"
  else
    echo "  !!! shellcheck is not installed: maintainer scripts only syntax-checked (apt-get install shellcheck)"
  fi
done

# ---------------------------------------------------------------------------------------------
# A real install of each package into its own isolated root. Foreign-architecture packages
# are installed as dpkg would on a multiarch system, and their binary runs under QEMU.
host_passwd=$(sha256sum /etc/passwd /etc/group)

install_test() { # install_test DEB
deb=$1
arch=$(dpkg-deb -f "$deb" Architecture)
case "$arch" in
  "$host_arch") runner=() ;;
  arm64) runner=(qemu-aarch64 -L /usr/aarch64-linux-gnu) ;;
  armhf) runner=(qemu-arm -L /usr/arm-linux-gnueabihf) ;;
  *) fail "no way to run $arch binaries here" ;;
esac
[ ${#runner[@]} -eq 0 ] || command -v "${runner[0]}" >/dev/null \
  || fail "${runner[0]} is missing to run the $arch binary (apt-get install qemu-user; cross/build.sh does)"
echo "== install $deb into an isolated root${runner[0]:+ (binary under ${runner[0]})} =="

root="$work/root-$arch"
mkdir -p "$root/etc" "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/tmp"
# Traversable like a real /, so the countersign user can reach its files below.
chmod 0755 "$work" "$root" "$root/var" "$root/var/lib"
printf 'root:x:0:0:root:/root:/bin/bash\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'root:*:19000:0:99999:7:::\n' >"$root/etc/shadow"
printf 'root:*::\n' >"$root/etc/gshadow"
chmod 0640 "$root/etc/shadow" "$root/etc/gshadow"
: >"$root/var/lib/dpkg/available"
# The package's dependencies, as this Debian has them: dpkg checks Depends for real.
# libc6 is Multi-Arch: same (one per architecture), passwd Multi-Arch: foreign (the host's).
stand_in() { # stand_in PACKAGE ARCH MULTI-ARCH
  printf 'Package: %s\nStatus: install ok installed\nPriority: required\nVersion: %s\nArchitecture: %s\nMulti-Arch: %s\nMaintainer: stand-in\nDescription: stand-in for the host package %s\n\n' \
    "$1" "$(dpkg-query -W -f='${Version}' "$1:$host_arch")" "$2" "$3" "$1" >>"$root/var/lib/dpkg/status"
}
stand_in libc6 "$arch" same
stand_in passwd "$host_arch" foreign
dpkg_root() { dpkg --root="$root" --force-script-chrootless "$@"; }
[ "$arch" = "$host_arch" ] || dpkg_root --add-architecture "$arch"
state="$root/var/lib/countersign-agent"
owner() { stat -c '%U:%G %a' "$1"; }  # names from the host; compare numerically below
numeric() { stat -c '%u:%g %a' "$1"; }

dpkg_root -i "$deb" >"$work/install.log" 2>&1 || { cat "$work/install.log"; fail "dpkg -i"; }
grep -q "created system user 'countersign'" "$work/install.log" || fail "postinst did not say it created the user"
line=$(grep '^countersign:' "$root/etc/passwd") || fail "no countersign user in the root's /etc/passwd"
IFS=: read -r _ _ uid gid _ home shell <<<"$line"
[ "$uid" -lt 1000 ] || fail "countersign is not a system user (uid $uid)"
[ "$home" = /var/lib/countersign-agent ] || fail "home of countersign: $line"
[ "$shell" = /usr/sbin/nologin ] || fail "shell of countersign: $line"
grep -q "^countersign:x:$gid:" "$root/etc/group" || fail "no countersign group with gid $gid"
ok "system user countersign uid $uid gid $gid, home $home, shell $shell"
[ "$(numeric "$state")" = "$uid:$gid 750" ] || fail "state dir is $(numeric "$state") ($(owner "$state")), want $uid:$gid 750"
[ "$(numeric "$root/etc/countersign")" = "0:$gid 750" ] || fail "/etc/countersign is $(numeric "$root/etc/countersign")"
[ "$(numeric "$root/etc/countersign/agent.toml")" = "0:$gid 640" ] || fail "agent.toml is $(numeric "$root/etc/countersign/agent.toml")"
[ "$(numeric "$root/usr/bin/countersign-agent")" = "0:0 755" ] || fail "binary is $(numeric "$root/usr/bin/countersign-agent")"
ok "state dir $uid:$gid 750, /etc/countersign 0:$gid 750, agent.toml 0:$gid 640, binary 0:0 755"
[ "$(sha256sum /etc/passwd /etc/group)" = "$host_passwd" ] || fail "the install changed the host's /etc/passwd or /etc/group"
ok "host users untouched"

# Real buffered data: the installed binary, as the countersign user, creates its sled
# database in the state directory (config and key beside, as an installer would have them).
"${runner[@]}" "$root/usr/bin/countersign-agent" keygen --out "$root/etc/countersign/gateway.key" >/dev/null
chown "$uid:$gid" "$root/etc/countersign/gateway.key"
cfg="$work/agent.toml"
sed -e "s|\"/etc/countersign/gateway.key\"|\"$root/etc/countersign/gateway.key\"|" \
    -e "s|\"/var/lib/countersign-agent\"|\"$state\"|" "$root/etc/countersign/agent.toml" >"$cfg"
chmod 0644 "$cfg"
as_agent() { setpriv --reuid="$uid" --regid="$gid" --clear-groups "${runner[@]}" "$root/usr/bin/countersign-agent" "$@"; }
as_agent check-config --config "$cfg" >/dev/null || fail "the installed binary rejects the default config"
as_agent inspect --config "$cfg" >"$work/inspect.json" || fail "the installed binary cannot open its database"
grep -q '"pending": 0' "$work/inspect.json" || fail "inspect: $(cat "$work/inspect.json")"
echo "marker $(date +%s)" >"$state/installer-marker"
data_sum() { (cd "$state" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
before=$(data_sum)
[ "$(find "$state" -type f | wc -l)" -gt 1 ] || fail "no database files in the state dir"
ok "the installed binary, as countersign, created its sled database ($(find "$state" -type f | wc -l) files)"
echo "# local edit by the installer" >>"$root/etc/countersign/agent.toml"

dpkg_root -i "$deb" >"$work/reinstall.log" 2>&1 || { cat "$work/reinstall.log"; fail "reinstall"; }
! grep -q "created system user" "$work/reinstall.log" || fail "reinstall created the user again"
[ "$(grep -c '^countersign:' "$root/etc/passwd")" -eq 1 ] || fail "duplicate user lines"
[ "$(data_sum)" = "$before" ] || fail "reinstall changed the buffered data"
ok "reinstall: idempotent, data unchanged"

# Upgrade: the same package as a newer version.
up="$work/up-$arch"
dpkg-deb -R "$deb" "$up"
v1=$(dpkg-deb -f "$deb" Version)
v2="$v1+upgradetest1"
sed -i "s/^Version: .*/Version: $v2/" "$up/DEBIAN/control"
dpkg-deb --root-owner-group -Zxz --build "$up" "$work/upgrade-$arch.deb" >/dev/null
dpkg_root -i "$work/upgrade-$arch.deb" >"$work/upgrade.log" 2>&1 || { cat "$work/upgrade.log"; fail "upgrade"; }
[ "$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Version} ${Status}' countersign-agent)" = "$v2 install ok installed" ] \
  || fail "after upgrade: $(dpkg-query --admindir="$root/var/lib/dpkg" -W countersign-agent)"
[ "$(data_sum)" = "$before" ] || fail "the upgrade changed the buffered data"
grep -q '^countersign:x:'"$uid:$gid": "$root/etc/passwd" || fail "the upgrade changed the user's uid/gid"
grep -qx '# local edit by the installer' "$root/etc/countersign/agent.toml" || fail "the upgrade lost the local config edit"
[ "$(numeric "$state")" = "$uid:$gid 750" ] || fail "state dir after upgrade: $(numeric "$state")"
as_agent inspect --config "$cfg" >/dev/null || fail "the upgraded binary cannot open the database"
before=$(data_sum)
ok "upgrade $v1 -> $v2: data, uid/gid, config edit and permissions kept; database opens"

dpkg_root -r countersign-agent >"$work/remove.log" 2>&1 || { cat "$work/remove.log"; fail "remove"; }
[ ! -e "$root/usr/bin/countersign-agent" ] || fail "remove left the binary"
[ ! -e "$root/lib/systemd/system/countersign-agent.service" ] || fail "remove left the unit"
[ "$(data_sum)" = "$before" ] || fail "remove changed the buffered data"
[ -f "$root/etc/countersign/agent.toml" ] || fail "remove deleted the config"
[ -f "$root/etc/countersign/gateway.key" ] || fail "remove deleted the gateway key"
grep -q "kept" "$work/remove.log" || fail "remove did not say the data is kept"
ok "remove: binary and unit gone; data, config and key kept"

dpkg_root -i "$deb" >"$work/reinstall2.log" 2>&1 || { cat "$work/reinstall2.log"; fail "install after remove"; }
[ "$(data_sum)" = "$before" ] || fail "install after remove changed the buffered data"
ok "install after remove: data still there"

dpkg_root -P countersign-agent >"$work/purge.log" 2>&1 || { cat "$work/purge.log"; fail "purge"; }
grep -q "purge deletes /var/lib/countersign-agent" "$work/purge.log" || fail "purge did not say it deletes the data"
[ ! -e "$state" ] || fail "purge left $state"
[ ! -e "$root/etc/countersign" ] || fail "purge left /etc/countersign"
grep -q '^countersign:' "$root/etc/passwd" || fail "purge removed the system user"
ok "purge: data, key and config deleted (and said so); system user kept"
[ "$(sha256sum /etc/passwd /etc/group)" = "$host_passwd" ] || fail "the host's /etc/passwd or /etc/group changed"
}

for deb in "$@"; do install_test "$deb"; done

echo "check-deb: all checks passed"
