#!/bin/sh
# user_data of the hostile VM in tests/integration/test_hostile_vm_qemu.py (busybox ash in the
# tiny guest). It mounts its joboutputs over NFSv4.1 (read-write, as a pilot may) and lays every
# trap it can for the factory reading that directory, then waits while the factory checks it:
# a shutdown_message that is a symlink to a host file, a FIFO named like the heartbeat file, a
# file over the size cap, hard links, bad names, a deep tree, too many files, a device node.
set -u
export PATH=/bin:/sbin
UUID='##user_data_uuid##'
HOST_FILE='##user_data_option_host_file##'
SERVER=169.254.169.254
say() { echo "HOSTILE: $*"; }

mkdir -p /mnt/jo
if ! timeout -s KILL 60 mount -t nfs4 -o "vers=4.1,proto=tcp,addr=$SERVER,rw" "$SERVER:/$UUID/joboutputs" /mnt/jo; then
    say "mount failed"
    poweroff -f
fi
cd /mnt/jo || poweroff -f
ln -s "$HOST_FILE" shutdown_message && say "made: symlink shutdown_message"
mkfifo heartbeat && say "made: fifo heartbeat"
dd if=/dev/zero of=big bs=1024 count=3072 2>/dev/null && say "made: big"
echo x > small && ln small hardlink && say "made: hardlink"
touch "$(printf 'bad\nname')" .hidden 'sp ace' && say "made: bad names"
d=deep
i=0
while [ "$i" -lt 40 ]; do d="$d/d"; i=$((i + 1)); done
mkdir -p "$d" && say "made: deep"
i=0
while [ "$i" -lt 300 ]; do echo "$i" > "f$i"; i=$((i + 1)); done
say "made: 300 files"
mknod dev c 1 3 2>/dev/null && say "made: device"
sync
say "traps set"
sleep 30  # the factory trims NFS joboutputs after its rounds (every cycle_seconds at least)
say "entries left: $(ls -A /mnt/jo | wc -l)"
cd /
umount /mnt/jo
poweroff -f
