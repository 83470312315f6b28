#!/bin/sh
# Run a command while CPU hogs keep every core busy: `make test-loaded` runs the suite this way
# to prove that its waits follow events and do not depend on an idle machine.
# Usage: tools/with-cpu-hogs.sh [-n HOGS] COMMAND [ARG...]   (HOGS defaults to the core count)
# The hogs are plain Python busy loops at the caller's priority (nice 0 from a normal shell),
# killed by their process ids when the command ends (also on Ctrl-C); its exit status is returned.
set -u
hogs=$(nproc)
if [ "${1:-}" = "-n" ]; then hogs=$2; shift 2; fi
[ "$#" -gt 0 ] || { echo "usage: $0 [-n HOGS] COMMAND [ARG...]" >&2; exit 64; }
python=${HOG_PYTHON:-python3}
pids=""
stop_hogs() {
    for pid in $pids; do kill -KILL "$pid" 2>/dev/null; done  # a TERM sent before exec can be lost
    for pid in $pids; do wait "$pid" 2>/dev/null; done
    pids=""
}
trap 'stop_hogs; exit 130' INT TERM
i=0
while [ "$i" -lt "$hogs" ]; do
    "$python" -c 'while 1: pass' &
    pids="$pids $!"
    i=$((i + 1))
done
echo "with-cpu-hogs: $hogs busy loop(s) running:$pids" >&2
"$@"
status=$?
stop_hogs
echo "with-cpu-hogs: hogs stopped; command exited $status" >&2
exit "$status"
