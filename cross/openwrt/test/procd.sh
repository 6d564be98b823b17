# A recording stand-in for OpenWrt's /lib/functions/procd.sh (openwrt/openwrt,
# package/system/procd/files/procd.sh), for testing init scripts without procd or ubus.
# It defines the same public functions that procd.sh's _procd_wrapper defines, with the same
# argument shapes, and instead of building JSON for `ubus call service ...` it appends one
# line per call to $PROCD_STUB_LOG (default $IPKG_INSTROOT/tmp/procd-calls.log): the function name, then each argument, separated by tabs.
# It also refuses what the real JSON builder would turn into a broken message: a parameter
# outside an instance, an unknown procd_set_param type, a respawn that is not three numbers,
# a term_timeout that is not one number, an instance left open, a service closed twice.
# Sourced by cross/openwrt/test/rc.common (the stand-in for /etc/rc.common).
# shellcheck shell=sh

# Default: beside the root's other scratch files (rc.common sources this for enable/disable
# too, as the real one does).
: "${PROCD_STUB_LOG:=${IPKG_INSTROOT:-}/tmp/procd-calls.log}"
_procd_stub_service=""
_procd_stub_instance=""

_procd_stub_record() {
	_procd_stub_line=$1; shift
	for _procd_stub_arg in "$@"; do _procd_stub_line="$_procd_stub_line	$_procd_stub_arg"; done
	printf '%s\n' "$_procd_stub_line" >>"$PROCD_STUB_LOG"
}

_procd_stub_fail() {
	echo "procd stub: $*" >&2
	printf 'ERROR\t%s\n' "$*" >>"$PROCD_STUB_LOG"
	return 1
}

_procd_stub_number() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }

# procd_open_service(name, [script])
procd_open_service() {
	if [ $# -lt 1 ] || [ $# -gt 2 ]; then _procd_stub_fail "procd_open_service takes a name and an optional script"; return 1; fi
	[ -z "$_procd_stub_service" ] || { _procd_stub_fail "procd_open_service: $_procd_stub_service is still open"; return 1; }
	_procd_stub_service=$1
	_procd_stub_record procd_open_service "$@"
}

# procd_close_service([set|add]): the real one adds the triggers and data, then calls ubus.
procd_close_service() {
	[ -n "$_procd_stub_service" ] || { _procd_stub_fail "procd_close_service without procd_open_service"; return 1; }
	[ -z "$_procd_stub_instance" ] || { _procd_stub_fail "procd_close_service: instance $_procd_stub_instance left open"; return 1; }
	service_triggers
	if type service_data >/dev/null 2>&1; then service_data; fi
	_procd_stub_record procd_close_service "${1:-set}"
	_procd_stub_service=""
}

# procd_open_instance([name])
procd_open_instance() {
	[ -n "$_procd_stub_service" ] || { _procd_stub_fail "procd_open_instance outside a service"; return 1; }
	[ -z "$_procd_stub_instance" ] || { _procd_stub_fail "procd_open_instance: $_procd_stub_instance is still open"; return 1; }
	_procd_stub_instance=${1:-instance1}
	_procd_stub_record procd_open_instance "$@"
}

procd_close_instance() {
	[ -n "$_procd_stub_instance" ] || { _procd_stub_fail "procd_close_instance without procd_open_instance"; return 1; }
	_procd_stub_record procd_close_instance
	_procd_stub_instance=""
}

# procd_set_param(type, [value...]), the types of the real _procd_set_param.
procd_set_param() {
	[ -n "$_procd_stub_instance" ] || { _procd_stub_fail "procd_set_param $1 outside an instance"; return 1; }
	case "$1" in
		env|data|limits|command|netdev|file|watch|watchdog|error) ;;
		respawn)
			if [ $# -ne 1 ] && { [ $# -ne 4 ] || ! _procd_stub_number "$2" || ! _procd_stub_number "$3" || ! _procd_stub_number "$4"; }; then
				_procd_stub_fail "procd_set_param respawn takes no value or three numbers (threshold timeout retry)"; return 1
			fi ;;
		nice|term_timeout)
			if [ $# -ne 2 ] || ! _procd_stub_number "${2#-}"; then _procd_stub_fail "procd_set_param $1 takes one integer"; return 1; fi ;;
		reload_signal|pidfile|user|group|seccomp|capabilities|facility|extroot|overlaydir|tmpoverlaysize|vrf)
			[ $# -eq 2 ] || { _procd_stub_fail "procd_set_param $1 takes one value"; return 1; } ;;
		stdout|stderr|no_new_privs)
			if [ $# -ne 2 ] || { [ "$2" != 0 ] && [ "$2" != 1 ]; }; then _procd_stub_fail "procd_set_param $1 takes 0 or 1"; return 1; fi ;;
		*) _procd_stub_fail "procd_set_param: unknown type '$1' (the real procd.sh drops it silently)"; return 1 ;;
	esac
	[ "$1" != command ] || [ $# -ge 2 ] || { _procd_stub_fail "procd_set_param command without a command"; return 1; }
	_procd_stub_record procd_set_param "$@"
}

procd_append_param() {
	[ -n "$_procd_stub_instance" ] || { _procd_stub_fail "procd_append_param $1 outside an instance"; return 1; }
	_procd_stub_record procd_append_param "$@"
}

# procd_kill(service, [instance]); procd_send_signal(service, [instance], [signal])
procd_kill() { _procd_stub_record procd_kill "$@"; }
procd_send_signal() { _procd_stub_record procd_send_signal "$@"; }
procd_running() { _procd_stub_record procd_running "$@"; return 1; }

# Everything else procd.sh wraps, recorded with its arguments.
procd_add_instance() { _procd_stub_record procd_add_instance "$@"; }
procd_add_raw_trigger() { _procd_stub_record procd_add_raw_trigger "$@"; }
procd_add_config_trigger() { _procd_stub_record procd_add_config_trigger "$@"; }
procd_add_interface_trigger() { _procd_stub_record procd_add_interface_trigger "$@"; }
procd_add_mount_trigger() { _procd_stub_record procd_add_mount_trigger "$@"; }
procd_add_reload_trigger() { _procd_stub_record procd_add_reload_trigger "$@"; }
procd_add_reload_data_trigger() { _procd_stub_record procd_add_reload_data_trigger "$@"; }
procd_add_reload_interface_trigger() { _procd_stub_record procd_add_reload_interface_trigger "$@"; }
procd_add_action_mount_trigger() { _procd_stub_record procd_add_action_mount_trigger "$@"; }
procd_add_reload_mount_trigger() { _procd_stub_record procd_add_reload_mount_trigger "$@"; }
procd_add_restart_mount_trigger() { _procd_stub_record procd_add_restart_mount_trigger "$@"; }
procd_open_trigger() { _procd_stub_record procd_open_trigger "$@"; }
procd_close_trigger() { _procd_stub_record procd_close_trigger "$@"; }
procd_open_validate() { _procd_stub_record procd_open_validate "$@"; }
procd_close_validate() { _procd_stub_record procd_close_validate "$@"; }
procd_add_jail() { _procd_stub_record procd_add_jail "$@"; }
procd_add_jail_mount() { _procd_stub_record procd_add_jail_mount "$@"; }
procd_add_jail_mount_rw() { _procd_stub_record procd_add_jail_mount_rw "$@"; }
procd_add_validation() { _procd_stub_record procd_add_validation "$@"; }
procd_set_config_changed() { _procd_stub_record procd_set_config_changed "$@"; }
