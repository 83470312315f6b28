#!/bin/sh
# user_data of the traceability test's guests (tests/integration/test_traceability_qemu.py).
# Busybox ash in the tiny guest. One script, three roles (user_data_option_role):
#   quiet  sends syslog_lines numbered lines, one every 0.5 s, then powers off with 200
#   flood  sends syslog as fast as it can for flood_seconds, then powers off with 200
#   hung   writes an evidence line to the first sector of its root disk (/dev/vda), logs it,
#          heartbeats for heartbeat_for seconds, then stops heartbeating and waits to be killed
# Every role first reads machinefeatures/syslog over HTTP, reports it with the
# ##user_data_syslog_server## substitution in joboutputs/syslog_report, and points busybox
# syslogd at it (-R), so `logger` lines go to the factory's receiver.
set -u
export PATH=/bin:/sbin

ROLE='##user_data_option_role##'
UUID='##user_data_uuid##'
SUBSTITUTED='##user_data_syslog_server##'
MF_URL='##user_data_machinefeatures_url##'
JO_URL='##user_data_joboutputs_url##'
LINES='##user_data_option_syslog_lines##'
FLOOD_SECONDS='##user_data_option_flood_seconds##'
HEARTBEAT_FOR='##user_data_option_heartbeat_for##'
MF_URL=${MF_URL%/} JO_URL=${JO_URL%/}

say() { echo "TRACE: $*"; }
put() {  # NAME TEXT: joboutputs/NAME = TEXT
    printf '%s\n' "$2" > /tmp/put
    timeout -s KILL 10 wget -q -O /dev/null --post-file=/tmp/put "$JO_URL/$1" || say "cannot write joboutputs/$1"
}
bye() {  # OUTCOME
    put shutdown_message "$1"
    sync
    say "powering off"
    poweroff -f
}

SYSLOG=$(timeout -s KILL 10 wget -q -O - "$MF_URL/syslog" | head -n 1)
put syslog_report "mjf=$SYSLOG substituted=$SUBSTITUTED"
say "role $ROLE, machinefeatures/syslog=$SYSLOG"
[ -n "$SYSLOG" ] || bye "500 no machinefeatures/syslog"
syslogd -R "$SYSLOG"
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -S /dev/log ] && break; sleep 0.2; done
logger -t trace "role $ROLE started, uuid $UUID"

case "$ROLE" in
quiet)
    i=1
    while [ "$i" -le "$LINES" ]; do
        logger -t quiet "quiet line $i of $LINES from $UUID"
        i=$((i + 1))
        sleep 0.5
    done
    sleep 1  # let syslogd send the last line
    bye "200 Success"
    ;;
flood)
    end=$(($(date +%s) + FLOOD_SECONDS))
    sent=0
    pad=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx
    while [ "$(date +%s)" -lt "$end" ]; do
        seq 1 500 | sed "s/^/flood $pad /" | logger -t flood
        sent=$((sent + 500))
    done
    put flood_sent "$sent"
    bye "200 Success"
    ;;
hung)
    printf 'VFEVIDENCE %s\n' "$UUID" | dd of=/dev/vda bs=512 count=1 conv=sync,notrunc,fsync 2>/dev/null \
        && logger -t hung "evidence written to /dev/vda" || logger -t hung "cannot write /dev/vda"
    end=$(($(date +%s) + HEARTBEAT_FOR))
    while [ "$(date +%s)" -lt "$end" ]; do
        put heartbeat "$(date +%s)"
        sleep 2
    done
    logger -t hung "heartbeat stopped; hanging"
    say "hanging"
    while :; do sleep 60; done
    ;;
*)
    bye "500 unknown role $ROLE"
    ;;
esac
