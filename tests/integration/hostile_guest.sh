#!/bin/sh
# user_data of the hostile VM in tests/integration/test_hostile_vm_qemu.py (busybox ash in the
# tiny guest). It mounts its joboutputs over NFSv4.1 (read-write, as a pilot may) and lays every
# trap it can for the factory reading that directory, then waits while the factory checks it:
# a shutdown_message that is a symlink to a host file, a FIFO named like the heartbeat file, a
# file over the size cap, hard links, bad names, a deep tree, too many files, a device node;
# then it fills a file it keeps open until the server refuses.
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
# a writer that keeps its file open while the factory deletes it as oversize (issue 13, 3c):
# each dd appends 64 KiB through the shell's descriptor and fsyncs, so the server's "no space"
# comes back at once; at most 64 MiB (4 times the cap the test sets)
# (the 300 files took every inode the VM has: wait for the factory's trim to free one; the
# file exists before "exec 3>>" opens it, as a failed redirection would end this shell)
i=0
while ! touch fill 2>/dev/null && [ "$i" -lt 30 ]; do i=$((i + 1)); sleep 1; done
if [ -f fill ]; then
    exec 3>>fill
    n=0
    while [ "$n" -lt 1024 ]; do
        dd if=/dev/zero bs=65536 count=1 conv=fsync 2>/dev/null >&3 || break
        n=$((n + 1))
        [ "$n" -eq 32 ] && sleep 8  # 2 MiB, over the file cap: the factory's trim unlinks it meanwhile
    done
    if [ "$n" -lt 1024 ]; then then_what=refused; else then_what="never refused"; fi
    say "fill: $((n * 65536)) bytes written, then $then_what"
    exec 3>&-
else
    say "fill: cannot create"
fi
sleep 30  # the factory trims NFS joboutputs after its rounds (every cycle_seconds at least)
say "entries left: $(ls -A /mnt/jo | wc -l)"
cd /
umount /mnt/jo
poweroff -f
