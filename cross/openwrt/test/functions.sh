# A stand-in for OpenWrt's /lib/functions.sh (openwrt/openwrt,
# package/base-files/files/lib/functions.sh) in the isolated root of cross/check-ipk.sh: only
# what a package's generated postinst/prerm stubs call, with the same behaviour for a root
# given by IPKG_INSTROOT (an image build, which is what the test is):
#   default_postinst $0 $@  user and group from the control field Require-User
#                           (name[=id]:group[=id]; free ids counted up from 32768, as
#                           group_add_next/user_add), then postinst-pkg in a subshell, then
#                           `rc.common <init script> enable` for each /etc/init.d/ file listed;
#   default_prerm $0 $@     prerm-pkg in a subshell, then `rc.common <init script> disable`.
# shellcheck shell=sh

_fs_next_id() { # _fs_next_id FILE: the first id from 32768 not used in FILE's third column
	_fs_id=32768
	while cut -d: -f3 "$1" | grep -qx "$_fs_id"; do _fs_id=$((_fs_id + 1)); done
	echo "$_fs_id"
}

add_group_and_user() {
	_fs_rusers=$(sed -ne 's/^Require-User: *//p' "$IPKG_INSTROOT/usr/lib/opkg/info/$1.control")
	for _fs_tuple in $_fs_rusers; do
		_fs_user=${_fs_tuple%%:*}; _fs_group=${_fs_tuple#*:}
		_fs_uname=${_fs_user%%=*}; _fs_uid=${_fs_user#*=}; [ "$_fs_uid" != "$_fs_user" ] || _fs_uid=""
		_fs_gname=${_fs_group%%=*}; _fs_gid=${_fs_group#*=}; [ "$_fs_gid" != "$_fs_group" ] || _fs_gid=""
		if ! grep -qs "^$_fs_gname:" "$IPKG_INSTROOT/etc/group"; then
			[ -n "$_fs_gid" ] || _fs_gid=$(_fs_next_id "$IPKG_INSTROOT/etc/group")
			echo "$_fs_gname:x:$_fs_gid:" >>"$IPKG_INSTROOT/etc/group"
		fi
		_fs_gid=$(grep "^$_fs_gname:" "$IPKG_INSTROOT/etc/group" | cut -d: -f3)
		if ! grep -qs "^$_fs_uname:" "$IPKG_INSTROOT/etc/passwd"; then
			[ -n "$_fs_uid" ] || _fs_uid=$(_fs_next_id "$IPKG_INSTROOT/etc/passwd")
			echo "$_fs_uname:x:$_fs_uid:$_fs_gid:$_fs_uname:/var/run/$_fs_uname:/bin/false" >>"$IPKG_INSTROOT/etc/passwd"
			echo "$_fs_uname:x:0:0:99999:7:::" >>"$IPKG_INSTROOT/etc/shadow"
		fi
	done
}

default_postinst() {
	_fs_pkg=$(basename "${1%.*}")
	_fs_ret=0
	add_group_and_user "$_fs_pkg"
	if [ -f "$IPKG_INSTROOT/usr/lib/opkg/info/$_fs_pkg.postinst-pkg" ]; then
		# shellcheck source=/dev/null
		( . "$IPKG_INSTROOT/usr/lib/opkg/info/$_fs_pkg.postinst-pkg" )
		_fs_ret=$?
	fi
	grep -s "^/etc/init.d/" "$IPKG_INSTROOT/usr/lib/opkg/info/$_fs_pkg.list" | while read -r _fs_i; do
		sh "$IPKG_INSTROOT/etc/rc.common" "$IPKG_INSTROOT$_fs_i" enable
	done
	return $_fs_ret
}

default_prerm() {
	_fs_pkg=$(basename "${1%.*}")
	_fs_ret=0
	if [ -f "$IPKG_INSTROOT/usr/lib/opkg/info/$_fs_pkg.prerm-pkg" ]; then
		# shellcheck source=/dev/null
		( . "$IPKG_INSTROOT/usr/lib/opkg/info/$_fs_pkg.prerm-pkg" )
		_fs_ret=$?
	fi
	grep -s "^/etc/init.d/" "$IPKG_INSTROOT/usr/lib/opkg/info/$_fs_pkg.list" | while read -r _fs_i; do
		sh "$IPKG_INSTROOT/etc/rc.common" "$IPKG_INSTROOT$_fs_i" disable
	done
	return $_fs_ret
}
