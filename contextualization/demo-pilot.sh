#!/bin/sh
# vacfactory demo pilot: a user_data template (contextualization/README.md has the contract).
# The factory replaces the ##user_data_...## markers (Vac's substitutions) and removes any left
# over; every empty option falls back to its default.  Busybox ash compatible; no wget -T (the
# Debian busybox-static build lacks it), every network step is bounded with `timeout`.
#
# 1. MJF: option mjf=http: wget from the machinefeatures/jobfeatures URLs (URLs in
#    /tmp/meta_data.json "meta", token URLs first, are preferred), joboutputs by HTTP POST;
#    mjf=nfs: NFSv4.1 mounts of the exports /tmp/meta_data.json "meta" names (nfs_server,
#    *_nfs_path), else of <server>:/<uuid>/{machinefeatures,jobfeatures,joboutputs};
#    mjf=files: the directories the MJF "URLs" name (a docker container's binds:
#    /etc/machinefeatures, /etc/jobfeatures, /var/spool/joboutputs).
#    Unset: files if the MJF URL is a path, nfs if meta_data.json names NFS exports
#    (mjf_transport = nfs), else http.
# 2. joboutputs/mjf_report: machinefeatures/KEY=VALUE and jobfeatures/KEY=VALUE for every key.
# 3. Work for lifetime s, writing joboutputs/<heartbeat_file> every heartbeat_interval s from
#    the start (no heartbeat from heartbeat_stop_after s on, if set: then it sleeps until it is
#    killed); stop early once jobfeatures/shutdowntime_job has passed.
# 4. joboutputs/shutdown_message = outcome, then power off (in a container: exit).
# Throughout, when machinefeatures/syslog names a server, busybox syslogd forwards the pilot's
# `logger` lines there (the factory files them under the VM's machine directory).
set -eu
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

# Substituted values, read through quoted here-documents so that any character is safe.
UUID=$(cat <<'VF_END'
##user_data_uuid##
VF_END
)
MACHINETYPE=$(cat <<'VF_END'
##user_data_machinetype##
VF_END
)
MF_URL=$(cat <<'VF_END'
##user_data_machinefeatures_url##
VF_END
)
JF_URL=$(cat <<'VF_END'
##user_data_jobfeatures_url##
VF_END
)
JO_URL=$(cat <<'VF_END'
##user_data_joboutputs_url##
VF_END
)
OPT_MJF=$(cat <<'VF_END'
##user_data_option_mjf##
VF_END
)
OPT_NFS_SERVER=$(cat <<'VF_END'
##user_data_option_nfs_server##
VF_END
)
OPT_HEARTBEAT_FILE=$(cat <<'VF_END'
##user_data_option_heartbeat_file##
VF_END
)
OPT_HEARTBEAT_INTERVAL=$(cat <<'VF_END'
##user_data_option_heartbeat_interval##
VF_END
)
OPT_HEARTBEAT_STOP_AFTER=$(cat <<'VF_END'
##user_data_option_heartbeat_stop_after##
VF_END
)
OPT_LIFETIME=$(cat <<'VF_END'
##user_data_option_lifetime##
VF_END
)
OPT_OUTCOME=$(cat <<'VF_END'
##user_data_option_outcome##
VF_END
)

WORK=/tmp/pilot
META=/tmp/meta_data.json
MNT=/mnt/vf

say() { echo "PILOT: $*"; }

# value VALUE DEFAULT: VALUE, unless it is empty or a marker the factory left in place
value() {
    case "$1" in
        '' | *'#''#user_data_'*) printf '%s' "$2" ;;
        *) printf '%s' "$1" ;;
    esac
}

is_uint() {
    case "$1" in
        '' | *[!0-9]*) return 1 ;;
    esac
}

uint() {  # uint VALUE DEFAULT
    _v=$(value "$1" "$2")
    if is_uint "$_v"; then printf '%s' "$_v"; else printf '%s' "$2"; fi
}

is_name() {  # a single safe path component
    case "$1" in
        '' | .* | *[!A-Za-z0-9._-]*) return 1 ;;
    esac
}

is_export_path() {  # an absolute path of safe characters, no .. component
    case "$1" in
        /*) ;;
        *) return 1 ;;
    esac
    case "$1/" in
        *[!A-Za-z0-9._/+=@-]* | */../*) return 1 ;;
    esac
}

is_host() {  # an IPv4 address or host name
    case "$1" in
        '' | -* | *[!A-Za-z0-9.:-]*) return 1 ;;
    esac
}

# json_string KEY FILE: the first "KEY": "string" in FILE (flat enough for meta_data.json)
json_string() {
    [ -s "$2" ] || return 0
    # shellcheck disable=SC2020  # one newline for each of , { }
    tr ',{}' '\n\n\n' < "$2" | sed 's#\\/#/#g' |
        sed -n 's/^[[:space:]]*"'"$1"'"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | head -n 1
}

# ---------------------------------------------------------------------------------------------
# MJF access: http or nfs

http_get() {  # URL -> stdout
    timeout -s KILL 10 wget -q -O - "$1" 2>/dev/null
}

list_keys() {  # DIR_OR_URL: one key per line
    if [ "$MJF" = http ]; then
        http_get "$1/" | tr '<' '\n' | sed -n 's/^a href="\([^"]*\)".*/\1/p'
    else
        ls -1 "$1"
    fi | while read -r _k; do
        if is_name "$_k"; then echo "$_k"; fi
    done
}

read_key() {  # DIR_OR_URL KEY -> value on stdout; fails if unreadable
    if [ "$MJF" = http ]; then
        http_get "$1/$2"
    else
        cat "$1/$2" 2>/dev/null
    fi
}

put_output() {  # NAME FILE: store FILE as joboutputs/NAME
    if [ "$MJF" = http ]; then
        timeout -s KILL 10 wget -q -O /dev/null --post-file="$2" "$JOBOUTPUTS/$1" 2>/dev/null
    else
        cat "$2" > "$JOBOUTPUTS/$1"
    fi
}

nfs_mount() {  # EXPORT MOUNTPOINT ro|rw
    mkdir -p "$2"
    timeout -s KILL 30 mount -t nfs4 -o "vers=4.1,proto=tcp,addr=$NFS_SERVER,$3" \
        "$NFS_SERVER:$1" "$2"
}

setup_http() {
    # meta_data.json "meta": the per-VM token URLs (*_token_url, work behind NAT too) win,
    # then its plain URLs, then the substituted ones
    for _suffix in _token_url ''; do
        _mf=$(json_string "machinefeatures$_suffix" "$META")
        _jf=$(json_string "jobfeatures$_suffix" "$META")
        _jo=$(json_string "joboutputs$_suffix" "$META")
        if [ -n "$_mf" ] && [ -n "$_jf" ] && [ -n "$_jo" ]; then
            MF_URL=$_mf JF_URL=$_jf JO_URL=$_jo
            say "MJF URLs from $META${_suffix:+ (token URLs)}"
            break
        fi
    done
    MACHINEFEATURES=$(value "$MF_URL" "")
    JOBFEATURES=$(value "$JF_URL" "")
    JOBOUTPUTS=$(value "$JO_URL" "")
    MACHINEFEATURES=${MACHINEFEATURES%/} JOBFEATURES=${JOBFEATURES%/} JOBOUTPUTS=${JOBOUTPUTS%/}
    if [ -z "$MACHINEFEATURES" ] || [ -z "$JOBFEATURES" ] || [ -z "$JOBOUTPUTS" ]; then
        say "no machinefeatures/jobfeatures/joboutputs URLs"
        return 1
    fi
}

# meta_nfs: the factory's word on where this VM's exports are (meta_data.json "meta":
# nfs_server, machinefeatures_nfs_path, jobfeatures_nfs_path, joboutputs_nfs_path); sets
# _server _mf _jf _jo, fails unless all three paths are there and sane
meta_nfs() {
    _server=$(json_string nfs_server "$META")
    _mf=$(json_string machinefeatures_nfs_path "$META")
    _jf=$(json_string jobfeatures_nfs_path "$META")
    _jo=$(json_string joboutputs_nfs_path "$META")
    is_export_path "$_mf" && is_export_path "$_jf" && is_export_path "$_jo"
}

setup_nfs() {
    if meta_nfs; then
        _from=$META
    else
        # no paths from the factory (an older one, or a stand-in): nfs-ganesha's /<uuid>/...
        if [ -z "$UUID" ]; then
            UUID=$(json_string uuid "$META")
        fi
        if ! is_name "$UUID"; then
            say "no usable uuid for the NFS exports"
            return 1
        fi
        _server="" _mf=/$UUID/machinefeatures _jf=/$UUID/jobfeatures _jo=/$UUID/joboutputs
        _from="the default /<uuid>/ paths"
    fi
    is_host "$_server" || _server=169.254.169.254
    # the option, when set, wins over the factory's nfs_server
    NFS_SERVER=$(value "$OPT_NFS_SERVER" "$_server")
    if ! { nfs_mount "$_mf" "$MNT/machinefeatures" ro &&
           nfs_mount "$_jf" "$MNT/jobfeatures" ro &&
           nfs_mount "$_jo" "$MNT/joboutputs" rw; }; then
        say "NFS mounts from $NFS_SERVER failed ($NFS_SERVER:$_mf, $NFS_SERVER:$_jf, $NFS_SERVER:$_jo)"
        return 1
    fi
    MACHINEFEATURES=$MNT/machinefeatures
    JOBFEATURES=$MNT/jobfeatures
    JOBOUTPUTS=$MNT/joboutputs
    say "mounted $NFS_SERVER:$_mf, $NFS_SERVER:$_jf and $NFS_SERVER:$_jo on $MNT (paths from $_from)"
}

cleanup_nfs() {
    [ "$MJF" = nfs ] || return 0
    sync
    for _d in joboutputs jobfeatures machinefeatures; do
        timeout -s KILL 10 umount "$MNT/$_d" 2>/dev/null || true
    done
}

# ---------------------------------------------------------------------------------------------

start_syslog() {  # forward syslog to machinefeatures/syslog (HOST:PORT), if the factory gives one
    _server=$(read_key "$MACHINEFEATURES" syslog 2>/dev/null | head -n 1 || true)
    case "$_server" in
        '' | *[!0-9A-Za-z.:_-]*) return 0 ;;
    esac
    syslogd -R "$_server" 2>/dev/null || return 0
    for _ in 1 2 3 4 5 6 7 8 9 10; do [ -S /dev/log ] && break; sleep 0.2; done
    SYSLOG=$_server
    say "syslog forwarded to $_server"
}

log() {  # a line to the factory's syslog receiver (if any)
    [ -z "${SYSLOG:-}" ] || logger -t demo-pilot "$*" 2>/dev/null || true
}

mjf_report() {
    : > "$WORK/mjf_report"
    for _kind in machinefeatures jobfeatures; do
        if [ "$_kind" = machinefeatures ]; then _base=$MACHINEFEATURES; else _base=$JOBFEATURES; fi
        for _key in $(list_keys "$_base"); do
            if _val=$(read_key "$_base" "$_key"); then
                printf '%s/%s=%s\n' "$_kind" "$_key" "$(printf '%s' "$_val" | tr '\n' ' ')" \
                    >> "$WORK/mjf_report"
            fi
        done
    done
    say "mjf_report: $(wc -l < "$WORK/mjf_report") keys"
    put_output mjf_report "$WORK/mjf_report" || say "could not write joboutputs/mjf_report"
}

heartbeat() {
    date +%s > "$WORK/heartbeat"
    put_output "$HEARTBEAT_FILE" "$WORK/heartbeat" || say "heartbeat write failed"
}

shutdown_time_passed() {  # NOW
    _sdt=$(read_key "$JOBFEATURES" shutdowntime_job || true)
    is_uint "$_sdt" && [ "$1" -ge "$_sdt" ]
}

work() {
    _start=$(date +%s)
    _end=$((_start + LIFETIME))
    _stop=""
    [ -z "$HEARTBEAT_STOP_AFTER" ] || _stop=$((_start + HEARTBEAT_STOP_AFTER))
    while :; do
        _now=$(date +%s)
        if [ -n "$_stop" ] && [ "$_now" -ge "$_stop" ]; then
            say "heartbeat stopped after $HEARTBEAT_STOP_AFTER s, as asked; sleeping until killed"
            while :; do sleep 60; done
        fi
        heartbeat
        if shutdown_time_passed "$_now"; then
            say "shutdowntime_job has passed: stopping early"
            return 0
        fi
        [ "$_now" -lt "$_end" ] || return 0
        _next=$((_now + HEARTBEAT_INTERVAL))
        [ "$_next" -le "$_end" ] || _next=$_end
        [ -z "$_stop" ] || [ "$_next" -le "$_stop" ] || _next=$_stop
        _now=$(date +%s)
        [ "$_next" -le "$_now" ] || sleep $((_next - _now))
    done
}

power_off() {
    sync
    if [ -n "${VF_PILOT_NO_POWEROFF:-}" ]; then  # for trying the pilot outside a VM
        say "done (VF_PILOT_NO_POWEROFF set: not powering off)"
        return 0
    fi
    if [ "${MJF:-}" = files ]; then  # a container ends when its command exits
        say "exiting"
        return 0
    fi
    say "powering off"
    poweroff -f 2>/dev/null || poweroff || true
}

# ---------------------------------------------------------------------------------------------

UUID=$(value "$UUID" "")
MACHINETYPE=$(value "$MACHINETYPE" "")
case "$MF_URL" in
    /*) MJF_DEFAULT=files ;;
    *) if meta_nfs; then MJF_DEFAULT=nfs; else MJF_DEFAULT=http; fi ;;
esac
MJF=$(value "$OPT_MJF" "$MJF_DEFAULT")
HEARTBEAT_FILE=$(value "$OPT_HEARTBEAT_FILE" heartbeat)
is_name "$HEARTBEAT_FILE" || HEARTBEAT_FILE=heartbeat
HEARTBEAT_INTERVAL=$(uint "$OPT_HEARTBEAT_INTERVAL" 5)
[ "$HEARTBEAT_INTERVAL" -gt 0 ] || HEARTBEAT_INTERVAL=5
HEARTBEAT_STOP_AFTER=$(uint "$OPT_HEARTBEAT_STOP_AFTER" "")
LIFETIME=$(uint "$OPT_LIFETIME" 20)
OUTCOME=$(value "$OPT_OUTCOME" "200 Success")

mkdir -p "$WORK"
say "uuid=$UUID machinetype=$MACHINETYPE mjf=$MJF lifetime=$LIFETIME" \
    "heartbeat=$HEARTBEAT_FILE/${HEARTBEAT_INTERVAL}s${HEARTBEAT_STOP_AFTER:+ stop after ${HEARTBEAT_STOP_AFTER}s}" \
    "outcome='$OUTCOME'"
case "$MJF" in
    http) setup_http || { power_off; exit 1; } ;;
    nfs) setup_nfs || { power_off; exit 1; } ;;
    files) MACHINEFEATURES=$MF_URL; JOBFEATURES=$JF_URL; JOBOUTPUTS=$JO_URL ;;
    *) say "unknown mjf option '$MJF' (http, nfs or files)"; power_off; exit 1 ;;
esac
export MACHINEFEATURES JOBFEATURES JOBOUTPUTS

start_syslog
log "starting: uuid=$UUID machinetype=$MACHINETYPE lifetime=${LIFETIME}s"
mjf_report
work
log "ending: $OUTCOME"
printf '%s\n' "$OUTCOME" > "$WORK/shutdown_message"
if put_output shutdown_message "$WORK/shutdown_message"; then
    say "shutdown_message: $OUTCOME"
else
    say "could not write joboutputs/shutdown_message"
fi
cleanup_nfs
power_off
