#!/usr/bin/env bash
# Checks countersign-agent .ipk packages (cross/package-ipk.sh), then installs each into an
# isolated root the way opkg does, and runs its init script under a recording procd.
#
# For every package:
#   - format, as OpenWrt's scripts/ipkg-build writes it: a gzipped tar of exactly
#     ./debian-binary (2.0), ./data.tar.gz, ./control.tar.gz in that order;
#   - control fields (Package, Version, Depends, Require-User, Maintainer, Architecture matching
#     the file name and the binary, Installed-Size = bytes of the uncompressed data tar,
#     Description, License, Section), conffiles, the postinst/prerm stubs of OpenWrt's
#     include/package-ipkg.mk, and the file list with owners and modes;
#   - the binary: static (no PT_INTERP), for the package's architecture;
#   - shellcheck -s sh on the init script and the package's own maintainer scripts.
# Then, in an empty root with OpenWrt's layout (its own /etc/passwd, /usr/lib/opkg/info,
# stand-ins for /lib/functions.sh, /etc/rc.common and /lib/functions/procd.sh from
# cross/openwrt/test/): data unpacked and maintainer scripts run as opkg runs them
# (/bin/sh -c "<info>/<pkg>.postinst configure", PKG_ROOT and IPKG_INSTROOT set to the root as
# in an image build, PKG_UPGRADE 0 or 1) for install, upgrade (modified conffile kept, the new
# one beside it as -opkg) and remove (binary and init script gone; data, key and the edited
# config kept). In between, the init script runs under the recording procd: refused without a
# key and on a RAM data_dir, then the exact procd calls (command, user, respawn, term_timeout,
# logging, files), then the recorded command runs for real (the installed binary, under QEMU
# for ARM), creates its database and stops on SIGTERM well within term_timeout.
# The host's own users and files outside the temporary roots are never touched.
#
# Usage: cross/check-ipk.sh IPK...      (as root: the install chowns to the package's user)
set -euo pipefail

[ $# -gt 0 ] || { echo "usage: cross/check-ipk.sh IPK..." >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "check-ipk: run as root (the install gives files to the package's user)" >&2; exit 1; }
for tool in tar gzip zcat md5sum readelf awk sha256sum; do
  command -v "$tool" >/dev/null || { echo "check-ipk: $tool is missing" >&2; exit 1; }
done
here=$(cd "$(dirname "$0")" && pwd)
stubs="$here/openwrt/test"

fail() { echo "check-ipk: FAIL: $*" >&2; exit 1; }
ok() { echo "  ok: $*"; }

work=$(mktemp -d)
trap '[ -n "${KEEP_WORK:-}" ] || rm -rf "$work"' EXIT
chmod 0755 "$work"
host_passwd=$(sha256sum /etc/passwd /etc/group)

# The generated maintainer script stubs of OpenWrt's include/package-ipkg.mk, byte for byte.
# shellcheck disable=SC2016 # their $ are for the device's shell
expected_postinst='#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@'
# shellcheck disable=SC2016
expected_prerm='#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_prerm $0 $@'

# ---------------------------------------------------------------------------------------------
static_checks() { # static_checks IPK DIR: unpacks IPK into DIR (outer/, control/, data/)
  local ipk=$1 x=$2 name members
  [ -f "$ipk" ] || fail "$ipk does not exist (build it with cross/package-ipk.sh)"
  echo "== $ipk =="
  name=$(basename "$ipk")
  [[ "$name" =~ ^countersign-agent_([^_]+)_(.+)\.ipk$ ]] || fail "file name '$name' is not <pkg>_<version>_<arch>.ipk"
  file_version=${BASH_REMATCH[1]} file_arch=${BASH_REMATCH[2]}
  gzip -t "$ipk" 2>/dev/null || fail "$name is not gzip (ipkg-build writes a gzipped tar)"
  members=$(tar -tzf "$ipk" | tr '\n' ' ')
  [ "$members" = "./debian-binary ./data.tar.gz ./control.tar.gz " ] ||
    fail "outer members are '$members', want './debian-binary ./data.tar.gz ./control.tar.gz' in that order"
  mkdir -p "$x/outer" "$x/control" "$x/data"
  tar -xzf "$ipk" -C "$x/outer"
  [ "$(cat "$x/outer/debian-binary")" = "2.0" ] || fail "debian-binary is '$(cat "$x/outer/debian-binary")', want 2.0"
  tar -xzf "$x/outer/control.tar.gz" -C "$x/control"
  tar -xzf "$x/outer/data.tar.gz" -C "$x/data"
  ok "format: gzipped tar of debian-binary (2.0), data.tar.gz, control.tar.gz (ipkg-build)"

  field() { sed -n "s/^$1: *//p" "$x/control/control" | head -n 1; }
  for f in Package Version Depends License Section Require-User Maintainer Architecture Installed-Size Description; do
    [ -n "$(field "$f")" ] || fail "control field $f is missing or empty:"$'\n'"$(cat "$x/control/control")"
  done
  [ "$(field Package)" = countersign-agent ] || fail "Package is '$(field Package)'"
  [ "$(field Version)" = "$file_version" ] || fail "Version $(field Version) differs from the file name's $file_version"
  [[ "$(field Version)" =~ ^[0-9][0-9A-Za-z.+~]*-[0-9]+$ ]] || fail "Version '$(field Version)' is not <version>-<release>"
  arch=$(field Architecture)
  [ "$arch" = "$file_arch" ] || fail "Architecture $arch differs from the file name's $file_arch"
  case "$arch" in
    aarch64_*) machine=AArch64 runner=(qemu-aarch64) ;;
    arm_*) machine=ARM runner=(qemu-arm) ;;
    x86_64) machine="Advanced Micro Devices X86-64" runner=() ;;
    *) fail "unexpected Architecture '$arch'" ;;
  esac
  [ "$(field Depends)" = procd ] || fail "Depends is '$(field Depends)', want procd (the binary is static; the init script needs procd)"
  [ "$(field Require-User)" = countersign:countersign ] || fail "Require-User is '$(field Require-User)'"
  size=$(zcat <"$x/outer/data.tar.gz" | wc -c)
  [ "$(field Installed-Size)" = "$size" ] || fail "Installed-Size $(field Installed-Size), the data tar has $size bytes"
  grep -q '^ ' "$x/control/control" || fail "Description has no continuation lines"
  ok "control: $(field Package) $(field Version) $arch, Depends: $(field Depends), Require-User: $(field Require-User), Installed-Size: $size"

  members=$(tar -tvzf "$x/outer/control.tar.gz" --numeric-owner | awk '{ print $1, $2, $6 }')
  for want in "-rw-r--r-- 0/0 ./control" "-rw-r--r-- 0/0 ./conffiles" "-rwxr-xr-x 0/0 ./postinst" \
    "-rwxr-xr-x 0/0 ./prerm" "-rwxr-xr-x 0/0 ./postinst-pkg" "-rwxr-xr-x 0/0 ./postrm"; do
    grep -qxF -- "$want" <<<"$members" || fail "control.tar.gz lacks '$want':"$'\n'"$members"
  done
  [ "$(cat "$x/control/conffiles")" = /etc/countersign/agent.toml ] || fail "conffiles: $(cat "$x/control/conffiles")"
  [ "$(cat "$x/control/postinst")" = "$expected_postinst" ] || fail "postinst is not OpenWrt's default_postinst stub"
  [ "$(cat "$x/control/prerm")" = "$expected_prerm" ] || fail "prerm is not OpenWrt's default_prerm stub"
  ok "control.tar.gz: control, conffiles (/etc/countersign/agent.toml), default_postinst/default_prerm stubs, postinst-pkg, postrm"

  members=$(tar -tvzf "$x/outer/data.tar.gz" --numeric-owner | awk '{ print $1, $2, $6 }')
  for want in "drwxr-xr-x 0/0 ./" "-rwxr-xr-x 0/0 ./usr/bin/countersign-agent" \
    "-rwxr-xr-x 0/0 ./etc/init.d/countersign-agent" "drwxr-x--- 0/0 ./etc/countersign/" \
    "-rw-r----- 0/0 ./etc/countersign/agent.toml"; do
    grep -qxF -- "$want" <<<"$members" || fail "data.tar.gz: missing or wrong mode/owner '$want' in:"$'\n'"$members"
  done
  ! grep -Eq ' \./(CONTROL|var|tmp|srv)(/|$)' <<<"$members" || fail "data.tar.gz ships CONTROL, /var, /tmp or /srv:"$'\n'"$members"
  ok "data.tar.gz: binary and init script 0755, /etc/countersign 0750, agent.toml 0640, all root; no CONTROL, nothing under /var, /tmp, /srv"

  bin="$x/data/usr/bin/countersign-agent"
  got=$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')
  [ "$got" = "$machine" ] || fail "binary is for '$got', package says $arch"
  ! readelf -lW "$bin" | grep -q INTERP || fail "binary is dynamic: $(readelf -lW "$bin" | grep interpreter)"
  ok "binary: $got, static (no PT_INTERP), $(stat -c %s "$bin") bytes"

  data_dir=$(sed -n 's/^data_dir = "\(.*\)"/\1/p' "$x/data/etc/countersign/agent.toml")
  case "$data_dir" in
    /tmp/*|/var/*|/run/*|"") fail "default data_dir '$data_dir' is in RAM on OpenWrt (/var links to /tmp)" ;;
  esac
  ok "default data_dir $data_dir (persistent; the init script warns if it is on the flash overlay)"

  if command -v shellcheck >/dev/null; then
    shellcheck -s sh "$x/data/etc/init.d/countersign-agent" "$x/control/postinst-pkg" "$x/control/postrm" \
      "$stubs/procd.sh" "$stubs/rc.common" "$stubs/functions.sh" || fail "shellcheck"
    ok "shellcheck -s sh: init script, postinst-pkg, postrm (and the procd/rc.common/functions.sh stand-ins)"
  else
    echo "  !!! shellcheck is not installed: scripts only syntax-checked (apt-get install shellcheck)"
  fi
  for s in "$x/data/etc/init.d/countersign-agent" "$x/control/postinst-pkg" "$x/control/postrm"; do
    sh -n "$s" || fail "$s has a syntax error"
  done
}

# ---------------------------------------------------------------------------------------------
# opkg's steps, for one package in one root. Scripts run as opkg-lede's pkg_run_script runs
# them; IPKG_INSTROOT is set as in an image build (offline root with --force-postinstall).
pkg=countersign-agent
run_script() { # run_script NAME ARG UPGRADE
  local s="$root/usr/lib/opkg/info/$pkg.$1"
  [ -f "$s" ] || return 0
  (cd "$root" && env IPKG_INSTROOT="$root" PKG_ROOT="$root" PKG_UPGRADE="$3" PATH="$shim:$PATH" /bin/sh -c "$s $2")
}
recorded_md5() { # the md5 of a conffile as installed, from the status file
  awk -v f="$1" '$1 == f { print $2 }' "$root/usr/lib/opkg/status"
}

opkg_install() { # opkg_install IPK UPGRADE(0|1)
  local ipk=$1 up=$2 u="$work/unpack" cf excludes=() line
  rm -rf "$u"; mkdir -p "$u/control" "$u/data"
  tar -xzf "$ipk" -C "$u"
  tar -xzf "$u/control.tar.gz" -C "$u/control"
  tar -xzf "$u/data.tar.gz" -C "$u/data"
  while read -r cf; do
    [ -n "$cf" ] || continue
    if [ -f "$root$cf" ] && [ -n "$(recorded_md5 "$cf")" ] &&
       [ "$(md5sum <"$root$cf" | cut -d' ' -f1)" != "$(recorded_md5 "$cf")" ]; then
      # Modified by the installer: kept; the package's version goes beside it (opkg's rule).
      excludes+=(--exclude=".$cf")
      if ! cmp -s "$u/data$cf" "$root$cf"; then
        cp -p "$u/data$cf" "$root$cf-opkg"
        echo "Existing conffile $cf is different from the conffile in the new package. The new conffile will be placed at $cf-opkg."
      fi
    fi
  done <"$u/control/conffiles"
  tar -xzf "$u/data.tar.gz" -C "$root" --same-owner --numeric-owner "${excludes[@]}"
  tar -tzf "$u/data.tar.gz" | sed -n 's#^\./\(.*[^/]\)$#/\1#p' >"$root/usr/lib/opkg/info/$pkg.list"
  for f in "$u/control"/*; do cp -p "$f" "$root/usr/lib/opkg/info/$pkg.$(basename "$f")"; done
  {
    sed -n '/^Package\|^Version\|^Depends\|^Architecture/p' "$u/control/control"
    echo "Status: install user installed"
    echo "Conffiles:"
    while read -r line; do echo " $line $(md5sum <"$u/data$line" | cut -d' ' -f1)"; done <"$u/control/conffiles"
  } >"$root/usr/lib/opkg/status"
  run_script postinst configure "$up"
}

opkg_remove() {
  local f
  run_script prerm remove 0
  while read -r f; do
    if [ -n "$(recorded_md5 "$f")" ] && [ -f "$root$f" ] &&
       [ "$(md5sum <"$root$f" | cut -d' ' -f1)" != "$(recorded_md5 "$f")" ]; then
      echo "Not deleting modified conffile $f."
      continue
    fi
    rm -f "$root$f"
  done <"$root/usr/lib/opkg/info/$pkg.list"
  rmdir "$root/etc/countersign" 2>/dev/null || true
  run_script postrm remove 0
  rm -f "$root/usr/lib/opkg/info/$pkg".*
  : >"$root/usr/lib/opkg/status"
}

# The init script under the recording procd: `rc.common <script> ACTION`, its paths pointed at
# the root (the binary through its QEMU runner), stub log returned in $work/procd.log.
initd() { # initd ACTION
  : >"$work/procd.log"
  (cd "$root" && env IPKG_INSTROOT="$root" PROCD_STUB_LOG="$work/procd.log" PATH="$shim:$PATH" \
    sh "$root/etc/rc.common" "$work/init.d/countersign-agent" "$1")
}
has_call() { grep -qxF -- "$(printf '%s' "$1")" "$work/procd.log"; }

install_test() { # install_test IPK (static_checks set arch and runner)
local ipk=$1 uid gid line before v1 v2 up cmd pid t0 waited term_timeout
echo "== install $ipk into an isolated OpenWrt root${runner[0]:+ (binary under ${runner[0]})} =="
[ ${#runner[@]} -eq 0 ] || command -v "${runner[0]}" >/dev/null ||
  fail "${runner[0]} is missing to run the $arch binary (apt-get install qemu-user; cross/build.sh does)"

root="$work/root-$arch"
rm -rf "$root"
mkdir -p "$root/etc/init.d" "$root/etc/rc.d" "$root/usr/lib/opkg/info" "$root/lib/functions" "$root/tmp" "$root/srv"
chmod 0755 "$root" "$root/srv"
printf 'root:x:0:0:root:/root:/bin/ash\ndaemon:*:1:1:daemon:/var:/bin/false\nnetwork:*:101:101:network:/var:/bin/false\nnobody:*:65534:65534:nobody:/var:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\ndaemon:x:1:\nnetwork:x:101:\nnogroup:x:65534:\n' >"$root/etc/group"
printf 'root:::0:99999:7:::\n' >"$root/etc/shadow"
: >"$root/usr/lib/opkg/status"
install -m 0644 "$stubs/functions.sh" "$root/lib/functions.sh"
install -m 0755 "$stubs/rc.common" "$root/etc/rc.common"
install -m 0644 "$stubs/procd.sh" "$root/lib/functions/procd.sh"
# chown by name resolves against the root's /etc/passwd and /etc/group, as on the device.
shim="$work/shim-$arch"
mkdir -p "$shim"
cat >"$shim/chown" <<SHIM
#!/bin/sh
# chown USER[:GROUP] PATH... with names from $root/etc/passwd and /etc/group
spec=\$1; shift
u=\${spec%%:*}; g=\${spec#*:}; [ "\$g" != "\$spec" ] || g=""
case "\$u" in *[!0-9]*) u=\$(awk -F: -v n="\$u" '\$1 == n { print \$3 }' "$root/etc/passwd") ;; esac
case "\$g" in ''|*[0-9]*) ;; *) g=\$(awk -F: -v n="\$g" '\$1 == n { print \$3 }' "$root/etc/group") ;; esac
[ -n "\$u" ] || { echo "chown: unknown user in \$spec" >&2; exit 1; }
exec /bin/chown "\$u\${g:+:\$g}" "\$@"
SHIM
chmod 0755 "$shim/chown"

opkg_install "$ipk" 0 >"$work/install.log" 2>&1 || { cat "$work/install.log"; fail "install"; }
line=$(grep '^countersign:' "$root/etc/passwd") || fail "default_postinst did not create the user from Require-User"
IFS=: read -r _ _ uid gid _ <<<"$line"
grep -q "^countersign:x:$gid:" "$root/etc/group" || fail "no countersign group with gid $gid"
[ "$(stat -c '%u:%g %a' "$root/etc/countersign")" = "0:$gid 750" ] || fail "/etc/countersign is $(stat -c '%u:%g %a' "$root/etc/countersign")"
[ "$(stat -c '%u:%g %a' "$root/etc/countersign/agent.toml")" = "0:$gid 640" ] || fail "agent.toml is $(stat -c '%u:%g %a' "$root/etc/countersign/agent.toml")"
[ "$(stat -c '%u:%g %a' "$root/usr/bin/countersign-agent")" = "0:0 755" ] || fail "binary is $(stat -c '%u:%g %a' "$root/usr/bin/countersign-agent")"
[ "$(readlink "$root/etc/rc.d/S95countersign-agent")" = ../init.d/countersign-agent ] || fail "not enabled: no /etc/rc.d/S95countersign-agent"
[ "$(readlink "$root/etc/rc.d/K10countersign-agent")" = ../init.d/countersign-agent ] || fail "no /etc/rc.d/K10countersign-agent"
grep -q 'countersign-agent keygen' "$work/install.log" || fail "postinst did not print the next steps"
ok "install: user countersign uid $uid gid $gid (Require-User), /etc/countersign 0:$gid 750, agent.toml 0:$gid 640, enabled (S95/K10)"
[ "$(sha256sum /etc/passwd /etc/group)" = "$host_passwd" ] || fail "the install changed the host's /etc/passwd or /etc/group"

# The init script, its paths in the root; the binary through a runner script.
mkdir -p "$work/init.d" "$work/bin"
printf '#!/bin/sh\nexec %s "%s" "$@"\n' "${runner[*]}" "$root/usr/bin/countersign-agent" >"$work/bin/countersign-agent"
chmod 0755 "$work/bin/countersign-agent"
sed -e "s#^PROG=/usr/bin/countersign-agent#PROG=$work/bin/countersign-agent#" \
    -e "s#^CONF=/etc/countersign/agent.toml#CONF=$root/etc/countersign/agent.toml#" \
    "$root/etc/init.d/countersign-agent" >"$work/init.d/countersign-agent"
grep -q "^PROG=$work/bin/" "$work/init.d/countersign-agent" || fail "init script has no PROG= line to point at the test binary"
conf="$root/etc/countersign/agent.toml"
term_timeout=$(sed -n 's/^TERM_TIMEOUT=\([0-9]*\)$/\1/p' "$work/init.d/countersign-agent")

# The installer's steps: data_dir and key path into the root (an edit of the conffile), no
# status listener (the port may be taken on a CI machine).
sed -i -e "s#^gateway_key_file = .*#gateway_key_file = \"$root/etc/countersign/gateway.key\"#" \
       -e "s#^data_dir = \"\\(.*\\)\"#data_dir = \"$root\\1\"#" "$conf"
printf '\n[http]\nlisten = ""\n' >>"$conf"
data=$(sed -n 's/^data_dir = "\(.*\)"/\1/p' "$conf")

if initd start >"$work/start.log" 2>&1; then fail "start succeeded without a gateway key: $(cat "$work/procd.log")"; fi
grep -q 'no gateway key' "$work/start.log" || fail "start without key did not say why: $(cat "$work/start.log")"
! grep -q procd_open_instance "$work/procd.log" || fail "an instance was registered without a key"
ok "init: without a gateway key, start registers no instance and says why"

"${runner[@]}" "$root/usr/bin/countersign-agent" keygen --out "$root/etc/countersign/gateway.key" >/dev/null
chown "$uid:$gid" "$root/etc/countersign/gateway.key"

if grep -q '^tmpfs /dev/shm ' /proc/mounts; then
  cp "$conf" "$work/conf.saved"
  sed -i "s#^data_dir = .*#data_dir = \"/dev/shm/countersign-check-ipk-$$\"#" "$conf"
  if initd start >"$work/start.log" 2>&1; then fail "start accepted a data_dir on tmpfs"; fi
  grep -q 'RAM' "$work/start.log" || fail "start on tmpfs did not say why: $(cat "$work/start.log")"
  ! grep -q procd_open_instance "$work/procd.log" || fail "an instance was registered with data_dir on tmpfs"
  [ ! -e "/dev/shm/countersign-check-ipk-$$" ] || fail "start created the data dir on tmpfs"
  cat "$work/conf.saved" >"$conf"
  ok "init: data_dir on tmpfs (RAM) refused"
fi

initd start >"$work/start.log" 2>&1 || fail "start: $(cat "$work/start.log") $(cat "$work/procd.log")"
! grep -q '^ERROR' "$work/procd.log" || fail "procd stub: $(grep '^ERROR' "$work/procd.log")"
T=$'\t'
prog="$work/bin/countersign-agent"
for want in \
  "procd_open_service${T}countersign-agent${T}$work/init.d/countersign-agent" \
  "procd_open_instance" \
  "procd_set_param${T}command${T}$prog${T}run${T}--config${T}$conf" \
  "procd_set_param${T}user${T}countersign" \
  "procd_set_param${T}respawn${T}3600${T}10${T}0" \
  "procd_set_param${T}term_timeout${T}$term_timeout" \
  "procd_set_param${T}stdout${T}1" \
  "procd_set_param${T}stderr${T}1" \
  "procd_set_param${T}file${T}$conf${T}$root/etc/countersign/gateway.key${T}$prog" \
  "procd_close_instance" \
  "procd_close_service${T}set"; do
  has_call "$want" || fail "start: no procd call '${want//$T/ }' in:"$'\n'"$(tr '\t' ' ' <"$work/procd.log")"
done
[ "$(stat -c '%u:%g %a' "$data")" = "$uid:$gid 750" ] || fail "start left data_dir $data as $(stat -c '%u:%g %a' "$data")"
# The agent's shutdown waits for an upload in flight (bounded by [http] timeout_ms) and flushes:
# procd must wait longer than that before SIGKILL.
http_timeout_ms=$(sed -n '/^\[http\]/,/^\[/s/^timeout_ms = \([0-9]*\)/\1/p' "$conf" | head -n 1)
http_timeout_s=$(( ${http_timeout_ms:-30000} / 1000 ))
[ "$term_timeout" -gt "$http_timeout_s" ] || fail "term_timeout $term_timeout s is not above the upload timeout ${http_timeout_s} s"
ok "init: start under the recording procd: command, user countersign, respawn 3600 10 0, term_timeout $term_timeout s (> upload timeout $http_timeout_s s), stdout/stderr to syslog, restart on a changed config, key or binary; data_dir $uid:$gid 750"

# What procd would run, run for real: it creates its database, then stops cleanly on SIGTERM.
mapfile -t cmd < <(grep "^procd_set_param${T}command${T}" "$work/procd.log" | cut -f3- | tr '\t' '\n')
setpriv --reuid="$uid" --regid="$gid" --clear-groups "${cmd[@]}" >"$work/agent.log" 2>&1 &
pid=$!
for _ in $(seq 300); do [ -f "$data/db" ] && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null || { cat "$work/agent.log"; fail "the agent exited on its own"; }
[ -f "$data/db" ] || { kill -KILL "$pid"; cat "$work/agent.log"; fail "the agent did not create its database in $data"; }
sleep 1
t0=$(date +%s%N)
kill -TERM "$pid"
waited=0
while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt $((term_timeout * 10)) ]; do sleep 0.1; waited=$((waited + 1)); done
if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; cat "$work/agent.log"; fail "the agent did not stop within term_timeout $term_timeout s"; fi
wait "$pid" || { cat "$work/agent.log"; fail "the agent exited non-zero on SIGTERM"; }
grep -q 'agent stopped' "$work/agent.log" || { cat "$work/agent.log"; fail "no 'agent stopped' after SIGTERM"; }
ok "the recorded command, run as countersign: database created in $data; SIGTERM -> clean exit in $(( ($(date +%s%N) - t0) / 1000000 )) ms (term_timeout $term_timeout s)"
"${runner[@]}" "$root/usr/bin/countersign-agent" inspect --config "$conf" >"$work/inspect.json" 2>/dev/null ||
  fail "the installed binary cannot open its database"
grep -q '"pending": 0' "$work/inspect.json" || fail "inspect: $(cat "$work/inspect.json")"
chown -R "$uid:$gid" "$data"

initd stop >"$work/stop.log" 2>&1 || fail "stop: $(cat "$work/stop.log")"
has_call "procd_kill${T}countersign-agent${T}" || fail "stop did not procd_kill the service: $(cat "$work/procd.log")"
ok "init: stop -> procd_kill countersign-agent (SIGTERM, then SIGKILL after term_timeout)"

data_sum() { (cd "$data" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
before=$(data_sum)
echo "# local edit by the installer" >>"$conf"

# Upgrade: the same package as a newer version, built as ipkg-build builds.
up="$work/up"
rm -rf "$up"; mkdir -p "$up/control" "$up/outer"
tar -xzf "$ipk" -C "$up/outer"
tar -xzf "$up/outer/control.tar.gz" -C "$up/control"
v1=$(sed -n 's/^Version: //p' "$up/control/control")
v2="${v1%-*}-$(( ${v1##*-} + 1 ))"
sed -i "s/^Version: .*/Version: $v2/" "$up/control/control"
(cd "$up/control" && tar --format=gnu --numeric-owner --owner=0 --group=0 --sort=name -cf - .) | gzip -n >"$up/outer/control.tar.gz"
(cd "$up/outer" && tar --format=gnu --numeric-owner --owner=0 --group=0 --sort=name -cf - ./debian-binary ./data.tar.gz ./control.tar.gz) |
  gzip -n >"$work/countersign-agent_${v2}_$arch.ipk"
opkg_install "$work/countersign-agent_${v2}_$arch.ipk" 1 >"$work/upgrade.log" 2>&1 || { cat "$work/upgrade.log"; fail "upgrade"; }
grep -qx "Version: $v2" "$root/usr/lib/opkg/status" || fail "status after upgrade: $(cat "$root/usr/lib/opkg/status")"
grep -qx '# local edit by the installer' "$conf" || fail "the upgrade lost the edited conffile"
[ -f "$conf-opkg" ] || fail "the upgrade did not put the package's agent.toml beside the edited one"
[ "$(grep -c '^countersign:' "$root/etc/passwd")" -eq 1 ] || fail "the upgrade added the user again"
grep -q "^countersign:x:$uid:$gid:" "$root/etc/passwd" || fail "the upgrade changed the user's uid/gid"
[ "$(stat -c '%u:%g %a' "$root/etc/countersign")" = "0:$gid 750" ] || fail "/etc/countersign after upgrade: $(stat -c '%u:%g %a' "$root/etc/countersign")"
[ "$(data_sum)" = "$before" ] || fail "the upgrade changed the buffered data"
[ -L "$root/etc/rc.d/S95countersign-agent" ] || fail "the upgrade disabled the service"
! grep -q 'keygen' "$work/upgrade.log" || fail "the upgrade printed the first-install steps again"
"${runner[@]}" "$root/usr/bin/countersign-agent" inspect --config "$conf" >/dev/null 2>&1 ||
  fail "the upgraded binary cannot open the database"
before=$(data_sum)
ok "upgrade $v1 -> $v2 (PKG_UPGRADE=1): edited agent.toml kept (package's beside it as agent.toml-opkg), user, permissions, data, enabled; database opens"

opkg_remove >"$work/remove.log" 2>&1 || { cat "$work/remove.log"; fail "remove"; }
[ ! -e "$root/usr/bin/countersign-agent" ] || fail "remove left the binary"
[ ! -e "$root/etc/init.d/countersign-agent" ] || fail "remove left the init script"
[ ! -e "$root/etc/rc.d/S95countersign-agent" ] || fail "remove left the service enabled"
grep -qsx '# local edit by the installer' "$conf" || fail "remove deleted the edited config"
[ -f "$root/etc/countersign/gateway.key" ] || fail "remove deleted the gateway key"
[ "$(data_sum)" = "$before" ] || fail "remove changed the buffered data"
grep -q 'kept' "$work/remove.log" || fail "remove did not say the data is kept"
ok "remove: binary, init script and rc.d links gone; buffered data, gateway key and edited config kept"
[ "$(sha256sum /etc/passwd /etc/group)" = "$host_passwd" ] || fail "the host's /etc/passwd or /etc/group changed"
}

for ipk in "$@"; do
  x="$work/x"
  rm -rf "$x"
  static_checks "$ipk" "$x"
  install_test "$ipk"
done
echo "check-ipk: all checks passed"
