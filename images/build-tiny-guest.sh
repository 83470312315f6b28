#!/bin/bash
# Build the vacfactory tiny guest: the Debian generic kernel plus a busybox-static initramfs
# whose /init is images/guest-init.  Only Debian packages are used (apt-get download +
# dpkg-deb -x into a scratch directory; nothing is installed into /boot).
#
#   images/build-tiny-guest.sh [OUTDIR]      (default OUTDIR: <repo>/images/build/tiny-guest)
#
# Outputs in OUTDIR: vmlinux (uncompressed ELF, PVH direct boot), vmlinuz (bzImage),
# initrd.img (gzip newc cpio) and manifest.txt.  Downloaded .debs are cached in
# <repo>/images/build/debs.  Nothing is rebuilt while the outputs are newer than this script,
# guest-init and udhcpc.script, unless FORCE=1.  See images/README.md.
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
OUT=${1:-$REPO/images/build/tiny-guest}
DEBS=${VF_DEB_CACHE:-$REPO/images/build/debs}
FORCE=${FORCE:-0}
INPUTS=("$HERE/build-tiny-guest.sh" "$HERE/guest-init" "$HERE/udhcpc.script")
OUTPUTS=(vmlinux vmlinuz initrd.img)
# Everything the guest may need; dependencies are resolved with modprobe --show-depends.
MODULES="virtio_pci virtio_net virtio_blk virtio_console virtio_rng 9pnet_virtio 9p nfsv4
         isofs cdrom sr_mod ata_piix ahci"

log() { echo "build-tiny-guest: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

up_to_date() {
    local o i
    for o in "${OUTPUTS[@]}"; do
        [ -s "$OUT/$o" ] || return 1
        for i in "${INPUTS[@]}"; do
            [ "$OUT/$o" -nt "$i" ] || return 1
        done
    done
}

summary() {
    local s="" o
    for o in "${OUTPUTS[@]}"; do
        s="$s $o=$(du -k "$OUT/$o" | cut -f1)K"
    done
    echo "tiny-guest: $1 in $OUT:$s kernel=$(sed -n 's/^kernel_version=//p' "$OUT/manifest.txt" 2>/dev/null)" \
         "($(( $(date +%s) - START ))s)"
}

START=$(date +%s)
for i in "${INPUTS[@]}"; do [ -f "$i" ] || die "missing input $i"; done
mkdir -p "$OUT" "$DEBS"
OUT=$(cd "$OUT" && pwd)

# Serialise concurrent builds of the same OUTDIR, then re-check under the lock.
exec 9>"$OUT/.lock"
flock 9
if [ "$FORCE" != 1 ] && up_to_date; then
    summary "up to date"
    exit 0
fi

# --- tools -------------------------------------------------------------------------------------
PATH=$PATH:/sbin:/usr/sbin    # depmod/modprobe live in /sbin, which may not be on PATH
need=()
command -v depmod >/dev/null 2>&1 && command -v modprobe >/dev/null 2>&1 || need+=(kmod)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
if [ "${#need[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "please install: ${need[*]}"
    log "installing ${need[*]}"
    apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi
for t in dpkg-deb apt-get apt-cache gzip python3 flock; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found"
done

# --- packages ----------------------------------------------------------------------------------
kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
cached_deb() {  # newest cached .deb of package $1, or nothing
    find "$DEBS" -maxdepth 1 -name "$1_*.deb" | sort -V | tail -n 1
}
KPKG=$(kernel_package)
if [ -z "$KPKG" ] && [ "$(id -u)" = 0 ]; then
    log "apt-get update (linux-image-amd64 not known to apt-cache)"
    apt-get update -qq >/dev/null 2>&1 || true
    KPKG=$(kernel_package)
fi
if [ -z "$KPKG" ]; then   # offline: fall back to the newest cached kernel
    KPKG=$(find "$DEBS" -maxdepth 1 -name 'linux-image-[0-9]*-amd64_*.deb' | sort -V |
           tail -n 1 | sed 's#.*/##; s#_.*##')
    [ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 and no cached kernel in $DEBS"
fi
KV=${KPKG#linux-image-}
for p in "$KPKG" busybox-static; do
    if [ -z "$(cached_deb "$p")" ]; then
        log "downloading $p"
        (cd "$DEBS" && apt-get download "$p" >/dev/null 2>&1) || die "apt-get download $p failed"
    fi
done
KDEB=$(cached_deb "$KPKG")
BDEB=$(cached_deb busybox-static)

# --- unpack (the kernel tree is ~400 MB: scratch directory removed on exit) ---------------------
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
K=$WORK/kernel
R=$WORK/root
mkdir -p "$K" "$WORK/busybox"
dpkg-deb -x "$KDEB" "$K"
dpkg-deb -x "$BDEB" "$WORK/busybox"
[ -f "$K/boot/vmlinuz-$KV" ] || die "no boot/vmlinuz-$KV in $KDEB"
grep -q '^CONFIG_PVH=y' "$K/boot/config-$KV" || die "$KPKG lacks CONFIG_PVH"
depmod -b "$K" "$KV"

# --- initramfs tree ----------------------------------------------------------------------------
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,root,etc,mnt/config,usr/share/udhcpc,lib/modules/"$KV"}
chmod 1777 "$R/tmp"
cp "$WORK/busybox/bin/busybox" "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do
    [ "$a" = busybox ] || ln -s busybox "$R/bin/$a"
done
ln -s ../bin/busybox "$R/sbin/modprobe"     # the kernel's request_module() runs /sbin/modprobe
ln -s ../bin/busybox "$R/sbin/init"
install -m 0755 "$HERE/guest-init" "$R/init"
install -m 0755 "$HERE/udhcpc.script" "$R/usr/share/udhcpc/default.script"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\n' > "$R/etc/group"
printf '127.0.0.1 localhost\n' > "$R/etc/hosts"
: > "$R/etc/resolv.conf"

mods=$(for m in $MODULES; do modprobe -d "$K" -S "$KV" --show-depends "$m"; done |
       awk '$1 == "insmod" {print $2}' | sort -u)
[ -n "$mods" ] || die "no modules resolved"
for f in $mods; do
    rel=${f#"$K"/}
    mkdir -p "$R/$(dirname "$rel")"
    cp "$f" "$R/$rel"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    cp "$K/lib/modules/$KV/$f" "$R/lib/modules/$KV/"
done
depmod -b "$R" "$KV"
nmods=$(echo "$mods" | wc -l)

# --- outputs (written in the scratch dir, moved into place when complete) -----------------------
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -9 -n) > "$WORK/initrd.img"
cp "$K/boot/vmlinuz-$KV" "$WORK/vmlinuz"
# The bzImage carries the kernel as an xz-compressed ELF; QEMU boots the ELF directly through
# its PVH entry point, skipping real-mode setup and the decompressor (about 40% faster on TCG).
python3 - "$WORK/vmlinuz" "$WORK/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], 'rb').read()
start = data.find(b'\xfd7zXZ\x00')
if start < 0:
    sys.exit('no xz payload in the bzImage')
elf = lzma.LZMADecompressor().decompress(data[start:])
if elf[:4] != b'\x7fELF':
    sys.exit('the xz payload is not an ELF image')
with open(sys.argv[2], 'wb') as f:
    f.write(elf)
PY
{
    echo "kernel_package=$KPKG"
    echo "kernel_version=$KV"
    echo "kernel_deb=$(basename "$KDEB")"
    echo "busybox_deb=$(basename "$BDEB")"
    echo "modules=$(for f in $mods; do basename "$f" .ko; done | tr '\n' ' ' | sed 's/ $//')"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$WORK/manifest.txt"
mv -f "$WORK/manifest.txt" "$WORK/vmlinuz" "$WORK/vmlinux" "$OUT/"
mv -f "$WORK/initrd.img" "$OUT/"
summary "built ($nmods modules)"
