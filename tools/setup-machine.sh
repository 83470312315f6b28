#!/bin/bash
# Prepare this machine for vacfactory's demo and tests. Idempotent: each step is skipped when
# it is already done, so `make demo` and `make test` can call it every time.
#   1. Debian packages (libvirt, QEMU, dnsmasq, nfs-ganesha, rabbitmq-server, podman, ...)
#   2. libvirtd + virtlogd running (there is no systemd on the CI machines)
#   3. the Python venv in .venv with vacfactory installed editable
#   4. the tiny guest image (images/build/tiny-guest)
# Usage: tools/setup-machine.sh [--no-guest]
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WITH_GUEST=1
[ "${1:-}" = "--no-guest" ] && WITH_GUEST=0

say() { echo "setup: $*" >&2; }

PACKAGES=(
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils libvirt-dev pkg-config gcc
  dnsmasq-base iptables iproute2 kmod cpio nfs-ganesha nfs-ganesha-vfs rabbitmq-server
  genisoimage openssl python3-venv logrotate tmux chromium chromium-driver
  # containers (tests/podman_lab.py starts its own API service): podman would take crun, which
  # fails with this machine's hybrid cgroups, so runc by name; netavark is the network stack
  # the lab configures; busybox-static is the test image's userland
  podman runc conmon netavark busybox-static
)

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    say "missing Debian packages (run as root to install): ${missing[*]}"
    exit 1
  fi
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # the packages' postinst may try to start a rabbitmq node; we start our own in tests
}

libvirt_up() { virsh -c qemu:///system version >/dev/null 2>&1; }

# Start a daemon without the caller's open descriptors: it would hold them for its whole life
# (a caller's lock, or the pipe a CI runner reads to its end).
detached() {
  (
    for fd in /proc/self/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] && eval "exec $fd>&-"
    done
    exec "$@"
  )
}

start_libvirt() {
  libvirt_up && return 0
  [ "$(id -u)" = 0 ] || { say "libvirtd is not running and we are not root"; exit 1; }
  # Without udev /dev/kvm stays root-only, and libvirt then re-probes QEMU on every domain
  # start (~48 s each). Fix the mode before libvirtd starts.
  if [ -e /dev/kvm ]; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; fi
  [ -s /run/virtlogd.pid ] && kill -0 "$(cat /run/virtlogd.pid)" 2>/dev/null || detached virtlogd -d
  if ! { [ -s /run/libvirtd.pid ] && kill -0 "$(cat /run/libvirtd.pid)" 2>/dev/null; }; then
    rm -f /run/libvirtd.pid
    detached libvirtd -d
  fi
  for _ in $(seq 1 150); do libvirt_up && return 0; sleep 0.2; done
  say "libvirtd did not come up (see /var/log/libvirt/libvirtd.log)"
  exit 1
}

make_venv() {
  local stamp=.venv/.vacfactory-installed
  if [ -f "$stamp" ] && [ "$stamp" -nt setup.cfg ] && [ "$stamp" -nt pyproject.toml ]; then return 0; fi
  say "creating the Python venv in .venv"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  .venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import libvirt, dirq, stomp, argo_ams_library, docker, vacfactory" || { say "venv install failed"; exit 1; }
  touch "$stamp"
}

install_packages
start_libvirt
make_venv
if [ "$WITH_GUEST" = 1 ]; then
  bash images/build-tiny-guest.sh "$REPO/images/build/tiny-guest"
fi
say "ready (libvirt $(virsh -c qemu:///system version 2>/dev/null | awk '/library/{print $NF; exit}'), $(.venv/bin/python --version))"
