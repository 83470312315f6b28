#!/usr/bin/env python3
"""Accounting benchmarks (``make bench``).

1. record write + enqueue: ``account_vm`` (render, validate, durable archive write, dirq
   enqueue) for a stream of VMs, one at a time, and ``account_vms`` (the same, 8 at once).
   Goal: >= 1,000 VMs/s. Both are bound by the disk's fsync latency (the archive record is
   fsynced before the VM may be marked accounted), so the figure depends on the machine's
   I/O load; the fsync latency measured alongside is printed to make that visible.
2. ``apel sync`` over an archive of N records (default 1,000,000) spread over 12 months:
   every month is synced (``vacfactory apel sync --all``) in a child process, whose peak RSS
   is read from wait4(). Goal: < 30 s and < 200 MB.

3. what goes on the wire to ARGO AMS per 10,000 VMs, one message per VM and with
   ``apel_batch`` (500 records a message): messages (= HTTPS requests) and bytes of the
   publish requests' JSON bodies, each record S/MIME-signed with a throw-away host
   certificate and wrapped exactly as ``argo-ams-library`` wraps it. Goal: batched, at most
   1/100 of the messages and fewer bytes, and no message over AMS's 1 MB.

The archive is built in a temporary directory by writing files straight into the archive
layout (real record texts) and deleted afterwards. ``--records N`` runs it smaller.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from vacfactory.accounting import AccountingSettings, VMUsage, account_vm, account_vms  # noqa: E402
from vacfactory.atomic import atomic_write_bytes  # noqa: E402
from vacfactory.accounting import archive  # noqa: E402
from vacfactory.core.apel import job_message, month_start, months_between  # noqa: E402

MONTHS = months_between("202301", "202312")
BYTES_PER_RECORD = 4096 + 256  # one ext4 block plus directory entry and inode, roughly

SYNC_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from vacfactory.accounting import AccountingSettings, sync_month
from vacfactory.accounting import archive
settings = AccountingSettings(site="UKI-BENCH", space="vac01.example.org", factory="f1.example.org",
                              archive_dir=sys.argv[2], outgoing_dir=sys.argv[3])
started = time.monotonic()
total = 0
for month in archive.months(settings.archive_dir):
    result = sync_month(settings, month, time.time())
    total += sum(n for _, _, n in result.counts)
print(f"{time.monotonic() - started:.3f} {total}")
"""


def make_settings(state: str) -> AccountingSettings:
    return AccountingSettings(site="UKI-BENCH", space="vac01.example.org", factory="f1.example.org",
                              archive_dir=os.path.join(state, "apel-archive"),
                              outgoing_dir=os.path.join(state, "apel-outgoing"))


def usage(i: int, end: int) -> VMUsage:
    return VMUsage(uuid=f"{i:08x}-0000-4000-8000-{i:012x}", machinetype="lhcb-prod", hostname=f"vm{i}",
                   processors=8, start_time=end - 86000, end_time=end, cpu_seconds=80000, memory_mb=16384,
                   hs06_per_processor=10.5, accounting_fqan="/lhcb/Role=NULL/Capability=NULL")


def bench_account(base: str, vms: int) -> "tuple[float, float, float]":
    """(one at a time VMs/s, 8 at once VMs/s, median atomic durable write in ms)."""
    state = tempfile.mkdtemp(prefix="account-", dir=base)
    settings = make_settings(state)
    now = time.time()
    end = int(now) - 3600
    usages = [usage(i, end) for i in range(2 * vms + 1)]
    account_vm(usages[0], settings, now)  # create directories outside the timing
    started = time.perf_counter()
    for u in usages[1:vms + 1]:
        account_vm(u, settings, now)
    single = vms / (time.perf_counter() - started)
    started = time.perf_counter()
    results = account_vms(usages[vms + 1:], settings, now, workers=8)
    batch = vms / (time.perf_counter() - started)
    assert all(r.queue_name for r in results), "a VM was not queued"
    latencies = []
    probe = os.path.join(state, "fsync-probe")
    for _ in range(50):
        t = time.perf_counter()
        atomic_write_bytes(probe, b"x" * 700)
        latencies.append(time.perf_counter() - t)
    shutil.rmtree(state)
    return single, batch, sorted(latencies)[len(latencies) // 2] * 1000


def build_archive(archive_dir: str, records: int) -> None:
    """Write ``records`` job records straight into the archive layout, 12 months, 1 identity."""
    settings = make_settings(os.path.dirname(archive_dir))
    identity = settings.identity
    key = archive.identity_key(identity.site, identity.submit_host)
    per_month = -(-records // len(MONTHS))
    written = 0
    for month in MONTHS:
        directory = os.path.join(archive_dir, month, key)
        os.makedirs(directory, exist_ok=True)
        end = month_start(month) + 86400
        template = job_message(usage(0, end), identity, end + 60)
        old_uuid = usage(0, end).uuid
        for _ in range(min(per_month, records - written)):
            u = usage(written + 1, end)
            fd = os.open(os.path.join(directory, u.uuid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, template.replace(old_uuid, u.uuid).encode("ascii"))
            finally:
                os.close(fd)
            written += 1


def bench_sync(base: str, records: int) -> "tuple[float, float, float, int]":
    state = tempfile.mkdtemp(prefix="sync-", dir=base)
    archive_dir = os.path.join(state, "apel-archive")
    try:
        started = time.monotonic()
        build_archive(archive_dir, records)
        build_seconds = time.monotonic() - started
        child = subprocess.Popen([sys.executable, "-c", SYNC_CHILD, REPO, archive_dir,
                                  os.path.join(state, "apel-outgoing")], stdout=subprocess.PIPE)
        out = child.stdout.read().decode() if child.stdout else ""
        _, status, usage_ = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"sync child failed with {child.returncode}")
        seconds, counted = out.split()
        return float(seconds), usage_.ru_maxrss / 1024.0, build_seconds, int(counted)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def bench_wire(base: str, vms: int, batch_records: int = 500) -> "dict[str, tuple[int, int, int]]":
    """{"single"|"batched": (messages, bytes of publish bodies, largest body)} for ``vms`` VMs."""
    import json

    from argo_ams_library import AmsMessage

    from tests.unit.test_apel_support import make_pki
    from vacfactory.accounting.batching import Batch
    from vacfactory.accounting.smime import load_signer

    pki = make_pki(tempfile.mkdtemp(prefix="pki-", dir=base))
    signer = load_signer(pki.host_cert, pki.host_key, time.time())
    settings = make_settings(base)
    end = int(time.time()) - 3600
    bodies = [job_message(usage(i, end), settings.identity, time.time()) for i in range(1, vms + 1)]

    def wire(texts: "list[str]") -> "tuple[int, int, int]":
        sizes = []
        for n, text in enumerate(texts):
            signed = signer.sign(text.encode("ascii")).decode("ascii")
            message = AmsMessage(data=signed, attributes={"empaid": f"{n:08x}/{n:014x}"}).dict()
            sizes.append(len(json.dumps({"messages": [message]})))
        return len(sizes), sum(sizes), max(sizes)

    batched: "list[str]" = []
    batch = Batch(batch_records)
    for n, body in enumerate(bodies):
        if not batch.fits(body, 1):
            batched.append(batch.text())
            batch = Batch(batch_records)
        batch.add(str(n), body, 1)
    batched.append(batch.text())
    return {"single": wire(bodies), "batched": wire(batched)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=5000, help="VMs per write + enqueue run (default 5000)")
    parser.add_argument("--records", type=int, default=1_000_000, help="archive size for sync (default 1000000)")
    parser.add_argument("--wire-vms", type=int, default=10_000, help="VMs for the AMS wire figure (default 10000)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to build (default the temp dir)")
    args = parser.parse_args()

    base = tempfile.mkdtemp(prefix="vacfactory-bench-apel-", dir=args.dir)
    try:
        free = shutil.disk_usage(base).free
        vfs = os.statvfs(base)
        need = args.records * BYTES_PER_RECORD
        if free < 2 * need or vfs.f_favail < 2 * args.records:
            raise SystemExit(f"not enough space in {base}: {free / 1e9:.1f} GB / {vfs.f_favail} inodes free,"
                             f" need about {need / 1e9:.1f} GB / {args.records} inodes (use --records)")
        rate, batch, write_ms = bench_account(base, args.vms)
        print(f"record write + enqueue: {rate:.0f} VMs/s (goal >= 1000)", flush=True)
        print(f"record write + enqueue, account_vms 8 at once: {batch:.0f} VMs/s"
              f" (durable atomic write on this disk now: {write_ms:.2f} ms median)", flush=True)
        seconds, peak_mb, build, counted = bench_sync(base, args.records)
        if counted != args.records:
            raise SystemExit(f"sync counted {counted} records, expected {args.records}")
        label = f"{args.records:,}"
        print(f"apel sync over {label} records: {seconds:.1f} s, peak RSS {peak_mb:.0f} MB"
              f" (goal < 30 s, < 200 MB; archive built in {build:.0f} s)")
        wire = bench_wire(base, args.wire_vms)
        for kind, (messages, size, largest) in wire.items():
            print(f"AMS wire per {args.wire_vms:,} VMs, {kind}: {messages:,} messages, {size / 1e6:.1f} MB"
                  f" (largest {largest / 1e3:.0f} kB)", flush=True)
        (single_messages, single_bytes, _), (batched_messages, batched_bytes, largest) = (
            wire["single"], wire["batched"])
        print(f"AMS wire, batched vs single: {single_messages / batched_messages:.0f}x fewer messages,"
              f" {100 * (1 - batched_bytes / single_bytes):.0f}% fewer bytes"
              " (goal >= 100x, fewer bytes, every message < 1 MB)")
        wire_ok = (batched_messages * 100 <= single_messages and batched_bytes < single_bytes
                   and largest < 1_000_000)
        ok = max(rate, batch) >= 1000 and seconds < 30 and peak_mb < 200 and wire_ok
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
