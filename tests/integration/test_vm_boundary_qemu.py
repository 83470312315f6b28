"""The VM boundary, proved with real TCG guests created by the real daemon (`vacfactory run`).

Three factory runs, one after another (only one daemon at a time can serve 169.254.169.253/.254
port 80 and NFS on .254:2049); each module-scoped scenario runs its factory to the end, stops
it, and the tests then check what the VMs reported against what the factory wrote:

- HTTP (2 slots, machinetypes ``nowork`` and ``steady``, both running the demo pilot):
  nowork's ``mjf_report`` holds every machine/job features key with the factory's value (the
  site's extra ``machinefeatures_option_db12`` included, here and over NFS), it
  heartbeats and ends with ``300 Nothing to do``: an abort, after which its slot goes to
  ``steady`` (which without the backoff would lose: nowork runs nothing and is the most
  starved). A steady VM that heartbeats outlives heartbeat_seconds + fizzle_seconds. A drain
  (``vacfactory drain --at +Ns`` and SIGHUP) rewrites ``shutdowntime``/``shutdowntime_job`` in
  the running VMs, and their pilots stop early with their own outcome.
- NFS (nfs-ganesha): the same report over NFSv4.1 mounts; the VM's three exports are in
  ganesha's configuration before its domain starts and gone once it has ended.
- Isolation: VM B (demo pilot, told to stop heartbeating) is started first; then a reload
  adds VM A, whose user_data tries to read and write B's files with B's token, with path
  tricks and by taking over B's IP address, and reports each HTTP status. Every attempt is
  refused and B's joboutputs hold nothing of A's; B is then killed with ``700 Heartbeat file
  not updated``. (Taking over B's address used to work: the VMs' NICs had no anti-spoofing
  filter, and the server identifies a VM by its source address.)

Every slot has the same MAC and IP in every factory, so another factory with real VMs running
on this host at the same time (another test run) takes our VMs' addresses and spoils a run;
the scenarios watch for that and fail saying so. ``VFVB_KEEP=1`` keeps the state directories
and logs (in /tmp/vfvb-*), ``VFVB_LOG_LEVEL=DEBUG`` makes the daemons log every joboutputs write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Dict, List

import pytest

from vacfactory.state.machines import Machine
from tests.integration.realfactory import (  # test_hostile_vm_qemu imports PILOT, nfs_port_holder from here
    PILOT, VACFACTORY, RealFactory, ganesha_exports, nfs_port_holder, read, wait_for,
)

pytestmark = pytest.mark.integration

HEARTBEAT_SECONDS = 20
GRACE_SECONDS = 30
#: a site's extra machinefeatures key (``machinefeatures_option_XXX``), set in the HTTP and NFS
#: scenarios: the VM must read it back like the standard keys
SITE_EXTRA = ("db12", "12.5")
SITE_EXTRA_SETTING = f"machinefeatures_option_{SITE_EXTRA[0]} = {SITE_EXTRA[1]}\n"


def factory_mjf(machine: Machine) -> Dict[str, str]:
    """Every key the factory wrote for ``machine``, as the pilot reports it (KIND/KEY -> value)."""
    values = {}
    for kind, directory in (("machinefeatures", machine.machinefeatures_dir),
                            ("jobfeatures", machine.jobfeatures_dir)):
        for key in os.listdir(directory):
            values[f"{kind}/{key}"] = read(os.path.join(directory, key)).rstrip("\n").replace("\n", " ")
    return values


def pilot_report(machine: Machine) -> Dict[str, str]:
    report = {}
    for line in read(os.path.join(machine.joboutputs_dir, "mjf_report")).splitlines():
        key, sep, value = line.partition("=")
        assert sep, f"bad mjf_report line {line!r}"
        report[key] = value
    return report


def assert_report_matches_factory(machine: Machine) -> None:
    expected = factory_mjf(machine)
    # the standard keys are there (an empty report of an empty directory proves nothing)
    for key in ("machinefeatures/total_cpu", "machinefeatures/shutdowntime", "machinefeatures/hs06",
                "jobfeatures/shutdowntime_job", "jobfeatures/job_id", "jobfeatures/jobstart_secs",
                "jobfeatures/wall_limit_secs", "jobfeatures/allocated_cpu"):
        assert key in expected, f"the factory did not write {key}"
    assert expected["jobfeatures/job_id"] == machine.uuid
    report = pilot_report(machine)
    assert report == expected, read(machine.console_log)
    # the site's extra key: written by the factory as configured, and read back by the VM
    key, value = f"machinefeatures/{SITE_EXTRA[0]}", SITE_EXTRA[1]
    assert (expected.get(key), report.get(key)) == (value, value), read(machine.console_log)


def joboutputs(machine: Machine) -> Dict[str, str]:
    return {name: read(os.path.join(machine.joboutputs_dir, name)) for name in os.listdir(machine.joboutputs_dir)}


def demo_pilot_type(name: str, share: int, options: str, heartbeat_seconds: int = HEARTBEAT_SECONDS,
                    fizzle_seconds: int = 40, backoff_seconds: int = 900, extra: str = "") -> str:
    return f"""
[machinetype {name}]
target_share = {share}
machine_model = vm-raw
kernel_image = {{kernel}}
initrd_image = {{initrd}}
kernel_cmdline = console=ttyS0 quiet panic=-1
user_data = {PILOT}
heartbeat_file = heartbeat
heartbeat_seconds = {heartbeat_seconds}
fizzle_seconds = {fizzle_seconds}
backoff_seconds = {backoff_seconds}
max_wallclock_seconds = 900
""" + textwrap.dedent(options) + textwrap.dedent(extra)


@pytest.fixture(scope="module")
def workdir():
    path = tempfile.mkdtemp(prefix="vfvb-")
    os.chmod(path, 0o755)
    yield path
    if not os.environ.get("VFVB_KEEP"):  # VFVB_KEEP=1: keep the state and logs to look at
        shutil.rmtree(path, ignore_errors=True)


def machinetypes(tiny_guest, *sections: str) -> str:
    text = "\n".join(textwrap.dedent(s) for s in sections)
    return text.replace("{kernel}", tiny_guest.kernel).replace("{initrd}", tiny_guest.initrd)


# =============================================================================================
# scenario 1: HTTP MJF, heartbeats, 300 -> backoff, drain


@dataclass
class HttpRun:
    factory: RealFactory
    nowork: Machine
    steady: List[Machine]
    heartbeat_values: List[str]
    nowork_heartbeat_mtimes: List[float]
    steady_alive_at: float            # when the first steady VM was seen alive...
    steady_alive_age: float           # ...this many seconds after it started
    steady_heartbeat_age: float       # its heartbeat file's age then
    drain_at: int
    drained_features: Dict[str, tuple] = field(default_factory=dict)  # uuid -> (shutdowntime, _job) while live
    log: str = ""
    elapsed: float = 0.0


@pytest.fixture(scope="module")
def http_run(workdir, tiny_guest) -> HttpRun:
    began = time.monotonic()
    f = RealFactory(workdir, "h")
    f.write_config(
        f"""\
        total_processors = 2
        grace_seconds = {GRACE_SECONDS}
        nfs_exporter = none
        """ + SITE_EXTRA_SETTING,
        machinetypes(
            tiny_guest,
            demo_pilot_type("nowork", 1, """\
                user_data_option_mjf = http
                user_data_option_outcome = 300 Nothing to do
                user_data_option_lifetime = 10
                user_data_option_heartbeat_interval = 2
                """),
            demo_pilot_type("steady", 1, """\
                user_data_option_mjf = http
                user_data_option_outcome = 200 Success
                user_data_option_lifetime = 900
                user_data_option_heartbeat_interval = 4
                """, fizzle_seconds=30),
        ),
    )
    try:
        f.start()
        # one round fills both slots: nowork and steady (after the first pick the other
        # machinetype is the more starved one)
        wait_for(lambda: f.of_type("nowork") and f.of_type("steady"), 60, "a nowork and a steady VM", factory=f)
        nowork = f.of_type("nowork")[0]
        heartbeats: List[str] = []
        mtimes: List[float] = []
        path = os.path.join(nowork.joboutputs_dir, "heartbeat")

        def nowork_ended() -> bool:
            value = read(path)
            if value and value not in heartbeats:
                heartbeats.append(value)
                mtimes.append(os.stat(path).st_mtime)
            return f.machines()[nowork.uuid].finished is not None

        wait_for(nowork_ended, 120, "the nowork VM to finish", interval=0.25, factory=f)
        nowork = f.machines()[nowork.uuid]

        # its slot goes to steady: nowork backs off
        wait_for(lambda: len([m for m in f.of_type("steady") if m.started]) >= 2, 60,
                 "a second steady VM in the slot nowork left", factory=f)

        # the first steady VM heartbeats and so outlives heartbeat_seconds and fizzle_seconds
        first = f.of_type("steady")[0]
        alive_until = first.started.time + 30 + HEARTBEAT_SECONDS + 10
        wait_for(lambda: time.time() >= alive_until or f.machines()[first.uuid].finished, 120,
                 "the first steady VM to run past fizzle_seconds + heartbeat_seconds", factory=f)
        seen = f.machines()[first.uuid]
        now = time.time()
        hb_age = now - os.stat(os.path.join(first.joboutputs_dir, "heartbeat")).st_mtime
        alive_age = now - seen.started.time if seen.finished is None else -1.0

        # drain: shutdown_time 25 s from now, published in the running VMs' MJF (within
        # grace_seconds, so the admin confirms it with --now)
        done = subprocess.run([VACFACTORY, "--config", f.config, "drain", "--at", "+25s", "--now"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        drain_at = int(re.search(r"shutdown_time = (\d+)", done.stdout).group(1))
        f.sighup()
        steady = f.of_type("steady")
        drained: Dict[str, tuple] = {}

        def published() -> bool:
            for m in steady:
                current = f.machines()[m.uuid]
                values = (read(os.path.join(m.machinefeatures_dir, "shutdowntime")),
                          read(os.path.join(m.jobfeatures_dir, "shutdowntime_job")))
                if current.finished is None and m.uuid not in drained and values == (str(drain_at),) * 2:
                    drained[m.uuid] = values
            return len(drained) == len(steady)

        wait_for(published, 20, "the drained shutdown time in the running VMs' MJF", interval=0.2, factory=f)
        wait_for(lambda: all(m.state == "done" for m in f.machines().values()), 25 + GRACE_SECONDS + 60,
                 "the drained VMs to end and be accounted", factory=f)
        f.stop()
        f.assert_alone()
        return HttpRun(
            factory=f, nowork=f.machines()[nowork.uuid], steady=[f.machines()[m.uuid] for m in steady],
            heartbeat_values=heartbeats, nowork_heartbeat_mtimes=mtimes,
            steady_alive_at=now, steady_alive_age=alive_age, steady_heartbeat_age=hb_age,
            drain_at=drain_at, drained_features=drained, log=f.log_text(), elapsed=time.monotonic() - began,
        )
    finally:
        f.cleanup()


def test_http_vm_reads_every_mjf_value_the_factory_wrote(http_run):
    assert_report_matches_factory(http_run.nowork)
    print(f"HTTP scenario took {http_run.elapsed:.0f} s")


def test_http_vm_heartbeat_appears_and_is_updated(http_run):
    values = http_run.heartbeat_values
    assert len(values) >= 2, f"heartbeat values seen: {values}"
    assert all(re.fullmatch(r"\d{10}\n", v) for v in values), values
    assert int(values[-1]) > int(values[0])
    assert http_run.nowork_heartbeat_mtimes == sorted(http_run.nowork_heartbeat_mtimes)


def test_300_nothing_to_do_is_an_abort_that_backs_the_machinetype_off(http_run):
    nowork = http_run.nowork
    assert read(os.path.join(nowork.joboutputs_dir, "shutdown_message")) == "300 Nothing to do\n"
    assert (nowork.finished.code, nowork.finished.text) == (300, "Nothing to do")
    assert nowork.finished.outcome == "abort" and nowork.finished.reason == "shutdown_message"
    assert nowork.accounted is not None and nowork.cleaned is not None
    # the slot went to steady although nowork (running nothing) was the more starved type,
    # and no nowork VM was started again while the factory ran (backoff_seconds = 900)
    f = http_run.factory
    assert [m.uuid for m in f.of_type("nowork")] == [nowork.uuid]
    second = http_run.steady[1]
    assert second.record.created >= nowork.finished.time
    assert second.record.slot == nowork.record.slot
    finishes = json.loads(read(os.path.join(f.state_dir, "finishes", "nowork.json")))
    assert (finishes["uuid"], finishes["outcome"], finishes["code"]) == (nowork.uuid, "abort", 300)


def test_a_vm_that_keeps_heartbeating_outlives_heartbeat_seconds(http_run):
    first = http_run.steady[0]
    assert http_run.steady_alive_age > 30 + HEARTBEAT_SECONDS, \
        f"the steady VM was not alive {30 + HEARTBEAT_SECONDS} s after it started"
    assert http_run.steady_heartbeat_age < HEARTBEAT_SECONDS
    assert first.finished.reason != "heartbeat_not_updated"


def test_drain_rewrites_shutdowntime_in_running_vms_and_the_pilot_ends_early(http_run):
    assert set(http_run.drained_features) == {m.uuid for m in http_run.steady}
    for machine in http_run.steady:
        assert http_run.drained_features[machine.uuid] == (str(http_run.drain_at),) * 2
        # the drain moved the VM's own shutdown time (900 s after its start) earlier
        assert machine.record.shutdown_time > http_run.drain_at + 600
        console = read(machine.console_log)
        assert "PILOT: shutdowntime_job has passed: stopping early" in console, console
        finished = machine.finished
        assert (finished.reason, finished.code, finished.text) == ("shutdown_message", 200, "Success"), finished
        assert http_run.drain_at <= finished.end_time < http_run.drain_at + GRACE_SECONDS
        assert f"shutdown time moved to {http_run.drain_at} (drain)" in http_run.log
    assert "Traceback" not in http_run.log


# =============================================================================================
# scenario 2: NFS MJF through nfs-ganesha


@dataclass
class NfsRun:
    factory: RealFactory
    machine: Machine
    exports_when_started: List[dict]
    exports_after: List[dict]
    log: str
    elapsed: float


@pytest.fixture(scope="module")
def nfs_run(workdir, tiny_guest) -> NfsRun:
    holder = nfs_port_holder()
    if holder:
        pytest.fail(f"another NFS server (not started by this test) holds 169.254.169.254:2049, where the "
                    f"factory's nfs-ganesha must bind: {holder}")
    began = time.monotonic()
    f = RealFactory(workdir, "n")
    f.write_config(
        """\
        total_processors = 1
        nfs_exporter = ganesha
        """ + SITE_EXTRA_SETTING,
        machinetypes(tiny_guest, demo_pilot_type("nfswork", 1, """\
            mjf_transport = nfs
            user_data_option_mjf = nfs
            user_data_option_outcome = 300 Nothing to do
            user_data_option_lifetime = 6
            user_data_option_heartbeat_interval = 2
            """)),
    )
    try:
        f.start()
        machine = wait_for(lambda: next((m for m in f.machines().values() if m.started), None), 60,
                           "the NFS VM to start", interval=0.05, factory=f)
        at_start = ganesha_exports(f.state_dir)
        wait_for(lambda: f.machines()[machine.uuid].state == "done", 120, "the NFS VM to end and be cleaned",
                 factory=f)
        after = ganesha_exports(f.state_dir)
        f.stop()
        f.assert_alone()
        return NfsRun(f, f.machines()[machine.uuid], at_start, after, f.log_text(), time.monotonic() - began)
    finally:
        f.cleanup()


def test_nfs_vm_reads_every_mjf_value_and_writes_joboutputs_over_ganesha(nfs_run):
    machine = nfs_run.machine
    console = read(machine.console_log)
    assert f"PILOT: mounted 169.254.169.254:/{machine.uuid}/" in console, console
    assert_report_matches_factory(machine)
    outputs = joboutputs(machine)
    assert re.fullmatch(r"\d{10}\n", outputs.get("heartbeat", "")), outputs
    assert outputs["shutdown_message"] == "300 Nothing to do\n"
    assert (machine.finished.code, machine.finished.outcome) == (300, "abort")
    # written over NFS into the VM's own size-limited filesystem, copied out when it was cleaned
    assert f"/{machine.uuid}: joboutputs is its own ext4 filesystem" in nfs_run.log
    assert not os.path.exists(os.path.join(machine.path, "joboutputs.img"))
    print(f"NFS scenario took {nfs_run.elapsed:.0f} s")


def test_nfs_exports_appear_before_the_domain_starts_and_are_withdrawn_when_it_ends(nfs_run):
    machine = nfs_run.machine
    mine = sorted((e["pseudo"], e["path"], e["readonly"], e["client"]) for e in nfs_run.exports_when_started
                  if e["uuid"] == machine.uuid)
    assert mine == [
        (f"/{machine.uuid}/jobfeatures", machine.jobfeatures_dir, True, machine.record.address),
        (f"/{machine.uuid}/joboutputs", machine.joboutputs_dir, False, machine.record.address),
        (f"/{machine.uuid}/machinefeatures", machine.machinefeatures_dir, True, machine.record.address),
    ]
    # the log orders it: exports confirmed by ganesha, then the domain created
    log = nfs_run.log
    exported = log.find(f"nfs-ganesha: {machine.uuid}: set 3 exports")
    created = log.find(f"created domain {machine.uuid}")
    assert 0 <= exported < created, log
    assert [e for e in nfs_run.exports_after if e["uuid"] == machine.uuid] == []
    assert log.find(f"nfs-ganesha: {machine.uuid}: removed exports") > created
    assert "Traceback" not in log


# =============================================================================================
# scenario 3: VM A attacks VM B over HTTP; B stops heartbeating and is killed

ATTACKER = r"""#!/bin/sh
# VM A: tries to read and write VM B's files; one report line per try: NAME STATUS BODY
export PATH=/bin:/sbin
VT=$(cat <<'VF_END'
##user_data_option_victim_token##
VF_END
)
VU=$(cat <<'VF_END'
##user_data_option_victim_uuid##
VF_END
)
VIP=$(cat <<'VF_END'
##user_data_option_victim_address##
VF_END
)
MJF=http://169.254.169.253
MD=http://169.254.169.254
R=/tmp/attack_report
: > "$R"
printf 'written by VM A\n' > /tmp/payload
OWN_TOKEN_MF=$(tr ',{}' '\n\n\n' < /tmp/meta_data.json | sed 's#\\/#/#g' |
    sed -n 's/^[[:space:]]*"machinefeatures_token_url"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
OWN_TOKEN=$(tr ',{}' '\n\n\n' < /tmp/meta_data.json |
    sed -n 's/^[[:space:]]*"vacfactory_token"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')

probe() {  # NAME wget-arguments...
    _name=$1; shift
    rm -f /tmp/body
    if _err=$(timeout -s KILL 10 wget -q -O /tmp/body "$@" 2>&1); then
        _code=OK
    else
        _code=$(printf '%s' "$_err" | sed -n 's/.*HTTP\/1\.[01] \([0-9][0-9][0-9]\).*/\1/p' | head -n 1)
        [ -n "$_code" ] || _code=ERR
    fi
    printf '%s %s %s\n' "$_name" "$_code" "$(head -c 100 /tmp/body 2>/dev/null | tr '\n' ' ')" >> "$R"
    echo "ATTACK: $_name -> $_code"
}

# controls: A reaches its own files by address and by its own token
probe own_job_id "$MJF/jobfeatures/job_id"
probe own_token_job_id "${OWN_TOKEN_MF%/machinefeatures}/jobfeatures/job_id"
# B's token, in the path and as a header, on both servers
probe b_token_path_mf "$MJF/vm/$VT/machinefeatures/total_cpu"
probe b_token_path_jf "$MJF/vm/$VT/jobfeatures/job_id"
probe b_token_path_listing "$MJF/vm/$VT/jobfeatures/"
probe b_token_header_jf --header "X-Vacfactory-Token: $VT" "$MJF/jobfeatures/job_id"
probe b_token_user_data "$MD/vm/$VT/latest/user-data"
probe b_token_meta_data "$MD/vm/$VT/openstack/latest/meta_data.json"
probe b_token_header_user_data --header "X-Vacfactory-Token: $VT" "$MD/latest/user-data"
probe b_token_path_own_header --header "X-Vacfactory-Token: $OWN_TOKEN" "$MJF/vm/$VT/jobfeatures/job_id"
probe b_token_post --post-file=/tmp/payload "$MJF/vm/$VT/joboutputs/shutdown_message"
probe b_token_header_post --post-file=/tmp/payload --header "X-Vacfactory-Token: $VT" \
    "$MJF/joboutputs/stolen"
# path tricks towards B's directories
probe dotdot_get "$MJF/machinefeatures/../../$VU/jobfeatures/job_id"
probe encoded_dotdot_get "$MJF/jobfeatures/..%2f..%2f$VU%2fjobfeatures%2fjob_id"
probe uuid_path_get "$MJF/$VU/jobfeatures/job_id"
probe dotdot_post --post-file=/tmp/payload "$MJF/joboutputs/../../$VU/joboutputs/stolen"
probe encoded_dotdot_post --post-file=/tmp/payload "$MJF/joboutputs/..%2f..%2f$VU%2fjoboutputs%2fstolen"
# take over B's address (and announce it), then ask by address
OWN_ADDR=$(ip -4 -o addr show dev eth0 | awk '{print $4; exit}')
ip addr flush dev eth0
ip addr add "$VIP/24" dev eth0
arping -U -c 2 -I eth0 "$VIP" >/dev/null 2>&1 || true
probe spoofed_address_get "$MJF/jobfeatures/job_id"
probe spoofed_address_post --post-file=/tmp/payload "$MJF/joboutputs/shutdown_message"
ip addr flush dev eth0
ip addr add "$OWN_ADDR" dev eth0
arping -U -c 1 -I eth0 "${OWN_ADDR%/*}" >/dev/null 2>&1 || true
cat "$R"
# report with its own token (and by address if that fails), then end
for _try in 1 2 3; do
    timeout -s KILL 10 wget -q -O /dev/null --post-file="$R" "$MJF/joboutputs/attack_report" && break
    sleep 2
done
printf '300 Nothing to do\n' > /tmp/message
timeout -s KILL 10 wget -q -O /dev/null --post-file=/tmp/message "$MJF/joboutputs/shutdown_message"
poweroff -f
"""

#: what each attack must get; the spoofed-address requests must not even reach the server
EXPECTED_REFUSALS = {
    "b_token_path_mf": "403",
    "b_token_path_jf": "403",
    "b_token_path_listing": "403",
    "b_token_header_jf": "403",
    "b_token_user_data": "403",
    "b_token_meta_data": "403",
    "b_token_header_user_data": "403",
    "b_token_path_own_header": "403",
    "b_token_post": "403",
    "b_token_header_post": "403",
    "dotdot_get": "404",
    "encoded_dotdot_get": "404",
    "uuid_path_get": "404",
    "dotdot_post": "403",
    "encoded_dotdot_post": "403",
    "spoofed_address_get": "ERR",
    "spoofed_address_post": "ERR",
}


@dataclass
class IsolationRun:
    factory: RealFactory
    victim: Machine
    attacker: Machine
    report: Dict[str, tuple]
    report_mtime: float
    victim_outputs: Dict[str, str]
    victim_domain_left: bool
    log: str
    elapsed: float


@pytest.fixture(scope="module")
def isolation_run(workdir, tiny_guest) -> IsolationRun:
    began = time.monotonic()
    f = RealFactory(workdir, "i")
    attacker_script = os.path.join(f.dir, "attacker.sh")
    with open(attacker_script, "w") as out:
        out.write(ATTACKER)
    victim_type = demo_pilot_type("victim", 1, """\
        user_data_option_mjf = http
        user_data_option_lifetime = 900
        user_data_option_heartbeat_interval = 3
        user_data_option_heartbeat_stop_after = 20
        """, fizzle_seconds=30)
    f.write_config("total_processors = 1\nnfs_exporter = none\n", machinetypes(tiny_guest, victim_type))
    try:
        f.start()
        victim = wait_for(lambda: next((m for m in f.machines().values() if m.started), None), 60,
                          "VM B to start", factory=f)
        # now VM A, with B's token, uuid and address in its user_data (a reload adds a slot)
        attacker_type = f"""
            [machinetype attacker]
            target_share = 1
            machine_model = vm-raw
            kernel_image = {tiny_guest.kernel}
            initrd_image = {tiny_guest.initrd}
            kernel_cmdline = console=ttyS0 quiet panic=-1
            user_data = {attacker_script}
            user_data_option_victim_token = {victim.record.token}
            user_data_option_victim_uuid = {victim.uuid}
            user_data_option_victim_address = {victim.record.address}
            fizzle_seconds = 1
            backoff_seconds = 900
            """
        f.write_config("total_processors = 2\nnfs_exporter = none\n",
                       machinetypes(tiny_guest, victim_type.replace("target_share = 1", "target_share = 0"),
                                    attacker_type))
        f.sighup()
        attacker = wait_for(lambda: next(iter(f.of_type("attacker")), None), 30, "VM A to be created", factory=f)
        report_path = os.path.join(attacker.joboutputs_dir, "attack_report")
        wait_for(lambda: f.machines()[attacker.uuid].finished, 120, "VM A to finish", factory=f)
        wait_for(lambda: f.machines()[victim.uuid].state == "done", 120,
                 "VM B to be killed for its stale heartbeat", factory=f)
        victim = f.machines()[victim.uuid]
        victim_outputs = joboutputs(victim)
        left = any(d.uuid == victim.uuid for d in f.domains())
        f.stop()
        f.assert_alone()
        report = {}
        for line in read(report_path).splitlines():
            name, status, *body = line.split(" ", 2)
            report[name] = (status, body[0] if body else "")
        mtime = os.stat(report_path).st_mtime if os.path.exists(report_path) else 0.0
        return IsolationRun(f, victim, f.machines()[attacker.uuid], report, mtime, victim_outputs, left,
                            f.log_text(), time.monotonic() - began)
    finally:
        f.cleanup()


def test_vm_a_cannot_read_or_write_vm_b_files_over_http(isolation_run):
    run = isolation_run
    report, victim, attacker = run.report, run.victim, run.attacker
    console = read(attacker.console_log)
    assert report, f"VM A reported nothing\n{console}"
    # the attack ran while B was alive and registered (so B's token was live)
    assert victim.started.time < run.report_mtime < victim.finished.end_time
    # the controls: A's own files are readable, so the refusals are not a broken network
    assert report["own_job_id"] == ("OK", attacker.uuid), console
    assert report["own_token_job_id"] == ("OK", attacker.uuid), console
    got = {name: report.get(name, ("missing", ""))[0] for name in EXPECTED_REFUSALS}
    assert got == EXPECTED_REFUSALS, console
    assert all(victim.uuid not in body for _, body in report.values()), report
    # nothing of A's reached B: only the pilot's own files, no shutdown_message
    assert set(run.victim_outputs) == {"mjf_report", "heartbeat"}, run.victim_outputs
    assert not any("VM A" in text for text in run.victim_outputs.values())
    assert "Traceback" not in run.log
    print(f"isolation scenario took {run.elapsed:.0f} s")


def test_a_vm_that_stops_heartbeating_is_killed_with_700_heartbeat_file_not_updated(isolation_run):
    victim = isolation_run.victim
    console = read(victim.console_log)
    assert "PILOT: heartbeat stopped after 20 s, as asked; sleeping until killed" in console, console
    finished = victim.finished
    assert (finished.code, finished.text) == (700, "Heartbeat file not updated"), finished
    assert (finished.reason, finished.outcome) == ("heartbeat_not_updated", "abort")
    last_heartbeat = os.stat(os.path.join(victim.joboutputs_dir, "heartbeat")).st_mtime
    assert finished.end_time - last_heartbeat > HEARTBEAT_SECONDS
    assert not isolation_run.victim_domain_left, "the killed VM's domain is gone"
    assert f"{victim.name}: killing: heartbeat_not_updated" in isolation_run.log
