"""The factory daemon: wires the engine to its adapters and runs it until told to stop.

Threads: the engine (the caller's thread), libvirt's event loop (inside the hypervisor
adapter), the MJF/metadata HTTP server, the VacQuery responder and the APEL sender. Signals:
SIGTERM/SIGINT stop creating and exit, leaving running VMs alone (they are adopted on the
next start); SIGHUP makes the engine re-read the configuration at once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from vacfactory.accounting.outgoing import backlog_of
from vacfactory.accounting.sender import send_is_due, send_queued
from vacfactory.accounting.settings import AccountingSettings
from vacfactory.accounting.sync import sync_at_stop, sync_if_due
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, ConfigWatcher
from vacfactory.core import scheduler
from vacfactory.core.views import MachinetypeState
from vacfactory.engine import policies
from vacfactory.engine.accountant import Accountant
from vacfactory.engine.boundary import VMBoundary, vm_meta
from vacfactory.engine.hostfacts_mjf import host_machinefeatures
from vacfactory.engine.hoststatus import HostStatusReader
from vacfactory.engine.snapshot import SnapshotPacer, build_snapshot, efficiency_last_day
from vacfactory.engine.snapshot import machine_status
from vacfactory.engine.spacewatch import SpaceWatcher
from vacfactory.engine.vmbuild import VMBuilder, uses_network
from vacfactory.errors import HypervisorError, VacFactoryError
from vacfactory.engine.factory import EngineParts, Environment, Factory
from vacfactory.hypervisor.addressing import NetworkSpec, slot_ip, slot_mac
from vacfactory.hypervisor.base import Hypervisor
from vacfactory.hypervisor.runtimes import machine_hypervisor, wants_containers
from vacfactory.fetch.imagecache import ImageCache
from vacfactory.logsetup import configure_logging  # noqa: F401 - re-exported for the CLI
from vacfactory.fetch.pipefetch import refresh_pipes
from vacfactory.space.auth import load_space_key
from vacfactory.space.responder import ResolvedPeers, Responder
from vacfactory.space.snapshot import FactorySnapshot
from vacfactory.space.vacmon import VacMonSender, cycle_messages, finished_message
from vacfactory.space.view import SpaceMemory, SpaceState
from vacfactory.state import kept
from vacfactory.state.lock import StateLock
from vacfactory.state.machines import Machine
from vacfactory.state.machines import MachineStore
from vacfactory.fetch.urlpolicy import UrlPolicy
from vacfactory.view.feed import engine_facts
from vacfactory.view.metrics import MetricsServer, MetricsSnapshot
from vacfactory.view.page import StatusPage
from vacfactory.vmio import syslogd
from vacfactory.vmio.http import MetadataServer, base_url
from vacfactory.vmio.jobfs import JobOutputsFS
from vacfactory.vmio.joboutputs import JobOutputsLimits
from vacfactory.vmio.syslogd import (
    SyslogLimits,
    SyslogReceiver,
    parse_hostport,
    receiver_address,
    registry_resolver,
)

log = logging.getLogger(__name__)

METADATA_ADDRESS = "169.254.169.254"
MJF_ADDRESS = "169.254.169.253"
NETWORK_REPAIR_SECONDS = 60.0
RETENTION_SECONDS = 600.0
# NFS writes bypass the HTTP caps: trimmed after every round (cycle_seconds), so a hostile
# VM can exceed its caps by at most what it writes between two rounds
JOBOUTPUTS_CHECK_SECONDS = 5.0
PIPES_SECONDS = 10.0  # only looks which pipes are due (cache_seconds >= 60); fetches those
IMAGE_PRUNE_SECONDS = 3600.0
VACMON_SECONDS = 60.0  # Vac sent its status once per 60 s cycle
BACKLOG_SECONDS = 30.0
SYSLOG_RESULTS = ("filed", "dropped_unknown", "dropped_rate", "dropped_size", "dropped_error")
ACCOUNTING_SECONDS = 300.0  # how often the daily sync and the sender's interval are checked


class BackgroundJob:
    """A job that may block (network fetches) and so runs in its own thread, never the engine's."""

    def __init__(self, name: str, interval: float, action: Callable[[], None]) -> None:
        self.name = name
        self.interval = interval
        self.action = action
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"vacfactory-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.action()
            except (VacFactoryError, OSError) as error:
                log.error("%s: %s", self.name, error)
            self._stopping.wait(self.interval)


class RecordingSpaceMemory(SpaceMemory):
    """The space watcher's memory, also keeping its last round's result: which factories
    answered, were held from an earlier answer, or were unknown (for /metrics)."""

    last: Optional[SpaceState] = None

    def update(self, replies, abort_on_700: bool, now: float) -> SpaceState:
        self.last = super().update(replies, abort_on_700, now)
        return self.last


@dataclass
class Periodic:
    """A job the daemon runs after engine rounds, at most every ``interval`` seconds."""

    name: str
    interval: float
    action: Callable[[], None]
    last: float = 0.0


class Daemon:
    """Everything one factory runs. ``start()`` then ``run()``; ``stop()`` from any thread."""

    def __init__(self, sources: ConfigSources, host_facts: Optional[HostFacts] = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``clock``: the wall clock of the engine and the accounting jobs (tests move it)."""
        self.host_facts = host_facts or HostFacts.probe()
        self.watcher = ConfigWatcher(sources, host_facts=self.host_facts)
        settings = self.config.settings
        #: ends the engine's wait between rounds: libvirt events, signals, finished downloads
        self.wake = threading.Event()
        self.lock = StateLock(settings.state_dir)
        self.store = MachineStore(settings.state_dir)
        live_models = [m.record.machine_model for m in self.store.load_all().values() if m.live]
        #: libvirt, plus the container runtime when there are containers to run or watch
        self.hypervisor, self.containers = machine_hypervisor(
            settings, wants_containers(self.config, live_models))
        # background: the engine never waits for an image download (the watchdog, the limits)
        self.images = ImageCache(
            settings.image_cache_dir, settings.pipe_ca_path,
            settings.image_fetch_timeout_seconds, settings.image_check_seconds,
            background=True, on_ready=self.wake.set,
            policy=UrlPolicy.from_words(settings.internal_url_hosts),
            max_bytes=int(settings.image_max_download_gb * (1 << 30)),
            reserve_bytes=settings.image_download_reserve_mb << 20,
        )
        self.builder = VMBuilder(settings.state_dir, self.images, host_machinefeatures(
            hypervisor=describe_hypervisor(self.hypervisor, settings.domain_type)),
            container_images=self.containers.image_status if self.containers is not None else None)
        self.boundary = VMBoundary(exporter=make_exporter(self.config), limits=joboutputs_limits(self.config),
                                   meta_source=self.vm_meta,
                                   jobfs=make_jobfs(self.config))
        self.space = SpaceWatcher(current_config(self.watcher))
        self.space.memory = RecordingSpaceMemory(self.space.memory.max_age)
        self.factory = Factory(
            EngineParts(config_source=self.watcher, hypervisor=self.hypervisor, store=self.store,
                        builder=self.builder, boundary=self.boundary,
                        accountant=Accountant.for_config(self.watcher)),
            Environment(host_processors=self.host_facts.cpu_count, space_view=self.space.view,
                        on_finished=self.vm_finished, on_created=self.vm_created, clock=clock, wake=self.wake),
        )
        self.host_status = HostStatusReader(settings.state_dir)
        self.started_at = time.time()
        #: when the configuration in force was accepted (start-up, or the reload that brought it)
        self.config_accepted_at = self.started_at
        self._config_seen = self.config
        self._sighup = threading.Event()
        self.factory.status_extra = self.status_extra
        self.snapshot: Optional[FactorySnapshot] = None
        self.snapshot_pacer = SnapshotPacer()
        self.http: Optional[MetadataServer] = None
        self.syslog: Optional[SyslogReceiver] = None
        self._syslog_settings: Optional[tuple] = None
        self.responder: Optional[Responder] = None
        #: the configuration the responder was last set up from (a reload is applied at once)
        self._responder_config = None
        self.peers: Optional[ResolvedPeers] = None
        self.metrics: Optional[MetricsServer] = None
        self.metrics_snapshot: Optional[MetricsSnapshot] = None
        self.page = StatusPage(settings.state_dir, clock=clock)
        self._backlog_cache = None
        self._efficiency_cache = None
        self.vacmon = VacMonSender(settings.vacmon_hostport) if settings.vacmon_hostport else None
        self._last_send: Optional[float] = None
        self.background = [
            BackgroundJob("pipes", PIPES_SECONDS, self.refresh_pipes),
            BackgroundJob("accounting", ACCOUNTING_SECONDS, self.accounting_jobs),
        ]
        self.periodic: List[Periodic] = [
            Periodic("network", NETWORK_REPAIR_SECONDS, self.ensure_network),
            Periodic("metadata server", NETWORK_REPAIR_SECONDS, self.ensure_http),
            Periodic("responder", NETWORK_REPAIR_SECONDS, self.ensure_responder),
            Periodic("joboutputs limits", JOBOUTPUTS_CHECK_SECONDS, self.enforce_joboutputs_limits),
            Periodic("metrics server", NETWORK_REPAIR_SECONDS, self.ensure_metrics),
            Periodic("image cache", IMAGE_PRUNE_SECONDS, self.prune_images),
            Periodic("syslog receiver", NETWORK_REPAIR_SECONDS, self.ensure_syslog),
            Periodic("retention", RETENTION_SECONDS, self.expire_evidence),
            Periodic("vacmon", VACMON_SECONDS, self.send_vacmon),
        ]

    @property
    def config(self):
        """The configuration in force: the one place the daemon reads it (the watcher keeps the
        last good one; the engine polls it at each round)."""
        return self.watcher.current

    def vm_meta(self) -> dict:
        """The metadata the HTTP server adds for every VM, from the configuration in force."""
        return vm_meta(self.config)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.lock.acquire()
        self.factory.start()
        self.publish_snapshot()
        self.page.start()
        self.run_periodic(force=True)  # the responder answers from here on
        self.space.start()
        self._wait_for_space(self.config.settings.udp_timeout_seconds + 2.0)
        for job in self.background:
            job.start()
        log.info("vacfactory started: factory %s, state %s, %d processors",
                 self.config.settings.factory_name, self.config.settings.state_dir,
                 self.config.settings.total_processors)
        notify_systemd("READY=1")

    def _wait_for_space(self, timeout: float) -> None:
        """Let the first query round end (one UDP deadline at most) before the first decision:
        deciding without it would fill every free processor as if this factory were alone in
        the space, and those VMs would skew the space's shares for their whole lifetime. A
        stop signal ends the wait at once."""
        deadline = time.monotonic() + timeout
        while not self.space.wait_first_round(0.1):
            if self.factory.stopping.is_set():
                return
            if time.monotonic() >= deadline:
                log.warning("space: the first query round has not ended; deciding without it")
                return

    def run(self, until: Optional[Callable[[], bool]] = None) -> None:
        """Run engine rounds (and the periodic jobs after each) until stopped."""
        self.factory.run(until=until, after_round=self._after_round)

    def _after_round(self) -> None:
        if self.config is not self._config_seen:
            self._config_seen = self.config
            self.config_accepted_at = time.time()
            if self.containers is None and wants_containers(self.config):
                log.warning("a docker machinetype was added by a reload: its containers start after vacfactory "
                            "restarts and connects to container_socket %s", self.config.settings.container_socket)
        if self._sighup.is_set():
            self._sighup.clear()
            errors = self.watcher.errors
            log.info("SIGHUP: configuration re-read; %s", "the edit was rejected (see above), the last good one "
                     "stays in force" if errors is not None else "the configuration in force was accepted at "
                     + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.config_accepted_at)))
        self.apply_image_settings()
        self.publish_snapshot()
        if self.config is not self._responder_config:
            self.run_job("responder", self.ensure_responder)  # a reload: not in a minute
        self.publish_metrics()
        self.page.feed(engine_facts(self))
        self.run_periodic()
        notify_systemd("WATCHDOG=1")

    def stop(self) -> None:
        self.factory.stop()

    def close(self) -> None:
        """Stop the servers and release the state lock; running VMs are left alone."""
        notify_systemd("STOPPING=1")
        self.factory.flush()
        self.final_sync()
        for job in self.background:
            job.stop()
        if self.metrics is not None:
            self.metrics.stop()
        self.page.stop()
        if self.syslog is not None:
            self.syslog.stop()
        if self.vacmon is not None:
            self.vacmon.close()
        self.space.stop()
        if self.responder is not None:
            self.responder.stop()
        if self.peers is not None:
            self.peers.stop()
        if self.http is not None:
            self.http.stop()
        self.hypervisor.close()
        self.lock.release()
        log.info("vacfactory stopped; running VMs were left running")

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: self._hangup())

    def _hangup(self) -> None:
        """SIGHUP: re-read the configuration now (acknowledged in the log after the round;
        logging inside a signal handler could deadlock on the handler's lock)."""
        self._sighup.set()
        self.wake.set()

    def status_extra(self) -> dict:
        """What the daemon adds to status.json for `vacfactory status`: itself, the
        configuration in force, backoffs and the space."""
        factory = self.factory
        config = self.config
        now = factory.clock()
        errors = self.watcher.errors
        backoffs = {}
        states = factory.own_states(now)
        adaptive = policies.adaptive_backoff(config)
        for mt in policies.machinetype_policies(config):
            state = states.get(mt.name)
            if state is not None and scheduler.backed_off(mt, state, now, adaptive):
                backoffs[mt.name] = {"until": scheduler._backoff_until(mt, state, now, adaptive),
                                     "last_abort": state.last_abort_time}
        sources = self.watcher.sources
        space = self.space.memory.last
        return {
            "daemon": {"pid": os.getpid(), "started": self.started_at},
            "config": {"files": sources.dropin_files() + [f for f in (sources.main_file,) if f],
                       "accepted": self.config_accepted_at,
                       "rejected": str(errors).splitlines() if errors is not None else None},
            "draining": bool(config.settings.draining),
            "shutdown_time": config.settings.shutdown_time,
            "backoffs": backoffs,
            "space": {"asked": [], "answered": [], "held": [], "unknown": []} if not self.space.others(config)
            else None if space is None else {
                "asked": sorted(self.space.others(config)), "answered": sorted(space.answered),
                "held": sorted(space.held), "unknown": sorted(space.unknown)},
        }

    # -- periodic jobs ------------------------------------------------------------------

    def run_periodic(self, force: bool = False) -> None:
        now = time.monotonic()
        for job in self.periodic:
            if force or now - job.last >= job.interval:
                job.last = now
                self.run_job(job.name, job.action)

    @staticmethod
    def run_job(name: str, action: Callable[[], None]) -> None:
        try:
            action()
        except (VacFactoryError, OSError) as error:
            log.error("%s: %s", name, error)

    def ensure_network(self) -> None:
        """Create or repair the private VM network (fixed MAC -> IP per slot)."""
        config = self.config
        if not uses_network(config):
            return
        spec = network_spec(config)
        try:
            self.hypervisor.ensure_network(spec)
        except HypervisorError as error:
            log.error("network %s: %s", spec.name, error)

    def ensure_http(self) -> None:
        """Serve MJF/metadata on 169.254.169.253/.254 once those addresses exist."""
        config = self.config
        if self.http is not None or not uses_network(config):
            return
        port = config.settings.http_port
        server = MetadataServer(
            self.boundary.registry,
            bind=[(MJF_ADDRESS, port), (METADATA_ADDRESS, port)],
            limits=self.boundary.limits,
            mjf_base_url=base_url(MJF_ADDRESS, port),
            metadata_base_url=base_url(METADATA_ADDRESS, port),
        )
        try:
            server.start()
        except (OSError, VacFactoryError) as error:
            log.error("metadata server cannot bind %s/%s port %d yet: %s", MJF_ADDRESS, METADATA_ADDRESS, port, error)
            return
        self.http = server

    def publish_snapshot(self) -> None:
        """Replace the responder's snapshot with one of the current state (atomic swap)."""
        factory = self.factory
        now = factory.clock()
        report = factory.last_report
        self.snapshot = self.snapshot_pacer.build(lambda: build_snapshot(
            self.config, factory.machines, factory.own_states(now), factory.last_finishes,
            self.host_status.read(), now, report.time if report else 0.0, self.http is not None,
            self._efficiency(now),
        ))

    def vm_created(self, machine: Machine) -> None:
        """Mid-round: publish new VMs to the space as the pacer allows (engine.snapshot)."""
        if self.snapshot_pacer.due():
            self.publish_snapshot()

    def publish_metrics(self) -> None:
        """Build the /metrics snapshot in the engine thread (the HTTP thread only reads it)."""
        factory = self.factory
        config = self.config
        now = factory.clock()
        running = {name: (0, 0) for name in config.machinetypes}
        for machine in factory.machines.values():
            if machine.live:
                vms, procs = running.get(machine.record.machinetype, (0, 0))
                running[machine.record.machinetype] = (vms + 1, procs + machine.record.processors)
        view = factory.own_states(now)
        backoff = {
            mt.name: scheduler.backoff_remaining(mt, view.get(mt.name, MachinetypeState()), now,
                                                 policies.adaptive_backoff(config))
            for mt in policies.machinetype_policies(config)
        }
        backlog = self._backlog(config, now)
        report = factory.last_report
        snapshot = factory.recorder.snapshot(
            config.settings.factory_name, config.settings.total_processors, running, backoff,
            backlog.count, (now - backlog.oldest) if backlog.oldest else None,
            not (report and report.blind),
        )
        syslog = self.syslog.stats if self.syslog is not None else None
        answered, held, unknown = self.space_factories()
        self.metrics_snapshot = dataclasses.replace(
            snapshot,
            cpu_efficiency=tuple(sorted(self._efficiency(now).items())),
            syslog=tuple((name, getattr(syslog, name)) for name in SYSLOG_RESULTS) if syslog else (),
            kept_overlays=len(kept.list_kept(config.settings.state_dir)),
            space_answered=answered, space_held=held, space_unknown=unknown,
        )

    def space_factories(self) -> Tuple[int, int, int]:
        """The other factories of the space: how many answered the last query round, how many
        are counted from an earlier answer (held), how many are unknown. An answer older than
        the watcher's staleness window counts for nothing, however the last round went (a
        stuck query thread), and a factory not yet asked (a reload) is unknown."""
        memory = self.space.memory
        last = memory.last if isinstance(memory, RecordingSpaceMemory) else None
        now = self.space.clock()
        answered = held = unknown = 0
        for name in self.space.others(self.config):
            if last is None or memory.age(name, now) > memory.max_age:
                unknown += 1
            elif name in last.answered:
                answered += 1
            elif name in last.held:
                held += 1
            else:
                unknown += 1
        return answered, held, unknown

    def _efficiency(self, now: float):
        """Per-machinetype CPU efficiency over the last day: recomputed when a VM has finished
        since the last time, else at most every minute (VMs age out of the day)."""
        finished = sum(1 for machine in self.factory.machines.values() if machine.finished is not None)
        cache = self._efficiency_cache
        if cache is None or cache[1] != finished or now - cache[0] >= 60:
            self._efficiency_cache = cache = (now, finished, efficiency_last_day(self.factory.machines, now))
        return cache[2]

    def _backlog(self, config, now: float):
        """The APEL queue's size, counted at most every BACKLOG_SECONDS (it lists files)."""
        if self._backlog_cache is None or now - self._backlog_cache[0] >= BACKLOG_SECONDS:
            self._backlog_cache = (now, backlog_of(os.path.join(config.settings.state_dir, "apel-outgoing")))
        return self._backlog_cache[1]

    def ensure_metrics(self) -> None:
        """Serve /metrics and the status page on metrics_port; a reload that changes the port
        or metrics_address moves it (port 0: none)."""
        port = self.config.settings.metrics_port
        address = self.config.settings.metrics_address
        if self.metrics is not None and (self.metrics.requested_port, self.metrics.bind_address) == (port, address):
            return
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
            log.info("metrics endpoint stopped (metrics_port changed)")
        if not port:
            return
        server = MetricsServer(port, lambda: self.metrics_snapshot, address=address, pages=self.page.answer)
        try:
            server.start()
        except OSError as error:
            log.error("metrics endpoint cannot bind %s:%d: %s", address, port, error)
            return
        self.metrics = server

    def refresh_pipes(self) -> None:
        """Fetch due vacuum pipes into their caches; the config watcher reloads from them."""
        for problem in refresh_pipes(self.config):
            log.warning("%s", problem)

    def accounting_jobs(self) -> None:
        """The daily APEL sync records, and the built-in sender when apel_send is on."""
        settings = AccountingSettings.from_config(self.config)
        now = self.factory.clock()
        written = sync_if_due(settings, now)
        if written:
            log.info("APEL sync records queued: %d", len(written))
        if send_is_due(settings, self._last_send, now):
            self._last_send = now
            result = send_queued(settings)
            log.info("APEL sender: %d sent, %d failed, %d still queued", result.sent, result.failed,
                     result.remaining)

    def final_sync(self) -> None:
        """Sync records counting what the final flush accounted (issue 18: a start-up sync
        alone leaves APEL seeing more jobs than the site reported)."""
        try:
            written = sync_at_stop(AccountingSettings.from_config(self.config), self.factory.clock())
        except (VacFactoryError, OSError) as error:
            log.error("final APEL sync failed (the next start syncs again): %s", error)
            return
        log.info("APEL sync records queued at stop: %d", len(written))

    def ensure_syslog(self) -> None:
        """Receive the VMs' syslog when syslog_server is this factory; restart on changes."""
        s = self.config.settings
        wanted = (receiver_address(s.syslog_server), s.syslog_forward, s.syslog_max_bytes_per_vm,
                  s.syslog_rate_per_vm, s.syslog_burst_per_vm)
        if self.syslog is not None and wanted == self._syslog_settings:
            return
        if self.syslog is not None:
            self.syslog.stop()
            self.syslog = None
        if wanted[0] is None or not uses_network(self.config):
            return
        receiver = SyslogReceiver(
            [wanted[0]], registry_resolver(self.boundary.registry),
            SyslogLimits(s.syslog_max_bytes_per_vm, s.syslog_rate_per_vm, s.syslog_burst_per_vm),
            parse_hostport(s.syslog_forward) if s.syslog_forward else None,
        )
        try:
            receiver.start()
        except OSError as error:
            log.error("syslog receiver cannot bind %s:%d yet: %s", wanted[0][0], wanted[0][1], error)
            return
        self.syslog, self._syslog_settings = receiver, wanted

    def expire_evidence(self) -> None:
        """Retention of VM syslog files and kept disks (machine directories: the engine)."""
        s = self.config.settings
        now = time.time()
        syslogd.expire([m.path for m in list(self.factory.machines.values())], s.syslog_days, now)
        for path in kept.expire_kept(s.state_dir, now):
            log.info("kept disks removed after keep_days: %s", path)

    def apply_image_settings(self) -> None:
        """The image cache follows configuration reloads (its next download uses them)."""
        s = self.config.settings
        self.images.ca_path = s.pipe_ca_path
        self.images.timeout = s.image_fetch_timeout_seconds
        self.images.check_seconds = s.image_check_seconds
        self.images.policy = UrlPolicy.from_words(s.internal_url_hosts)
        self.images.max_bytes = int(s.image_max_download_gb * (1 << 30))
        self.images.reserve_bytes = s.image_download_reserve_mb << 20

    def prune_images(self) -> None:
        """Delete cached image versions no live VM's overlay reads any more."""
        in_use = {m.record.root_image_path for m in self.factory.machines.values()
                  if m.cleaned is None and m.record.root_image_path}
        in_use |= kept.kept_backing_files(self.config.settings.state_dir)
        for path in self.images.prune(in_use):
            log.info("image cache: removed %s", path)

    def send_vacmon(self) -> None:
        wanted = tuple(self.config.settings.vacmon_hostport)
        if (self.vacmon.hostports if self.vacmon is not None else ()) != wanted:  # reloaded
            if self.vacmon is not None:
                self.vacmon.close()
            self.vacmon = VacMonSender(wanted) if wanted else None
        if self.vacmon is not None and self.snapshot is not None:
            self.vacmon.send(cycle_messages(self.snapshot, time.time()))

    def vm_finished(self, machine: Machine) -> None:
        """VacMon hears about every finished VM, with its real final state (not Vac's bug)."""
        if self.vacmon is not None and self.snapshot is not None:
            now = time.time()
            self.vacmon.send([finished_message(self.snapshot, machine_status(machine, now), now)])

    def ensure_responder(self) -> None:
        """Answer VacQuery on udp_port; only configured factories (and this host) get answers.

        Runs after every configuration reload and every minute (which also re-reads
        space_key_file): a changed vac_space or space key applies from the next datagram, a
        changed udp_port by binding the new port before the old one closes. If the new key
        cannot be read or the new port cannot be bound, the responder keeps serving as it was.
        """
        config = self.config
        s = config.settings
        self._responder_config = config
        if self.peers is None or set(self.peers.names) != set(self._peer_names(s)):
            if self.peers is not None:
                self.peers.stop()
            self.peers = ResolvedPeers(s.factories, local_name=s.factory_name)
            self.peers.start()
            if self.responder is not None:
                self.responder.allowed_peers = self.peers
        key = load_space_key(s.space_key, s.space_key_file)  # ConfigError: nothing changes
        if self.responder is not None:
            self.responder.reconfigure(s.vac_space, key)
            if self.responder.bind[1] != s.udp_port:
                try:
                    self.responder.rebind(("0.0.0.0", s.udp_port))
                except OSError as error:
                    log.error("VacQuery responder cannot move to UDP port %d yet (still on %d): %s",
                              s.udp_port, self.responder.bind[1], error)
            return
        responder = Responder(
            ("0.0.0.0", s.udp_port),
            lambda: self.snapshot,
            s.vac_space,
            self.peers,
            space_key=key,
        )
        try:
            responder.start()
        except OSError as error:
            log.error("VacQuery responder cannot bind UDP port %d yet: %s", s.udp_port, error)
            return
        self.responder = responder

    @staticmethod
    def _peer_names(settings) -> list:
        from vacfactory.space.client import canonical_names

        return canonical_names(list(settings.factories), settings.factory_name)

    def enforce_joboutputs_limits(self) -> None:
        """VMs writing over NFS bypass the HTTP caps: trim their joboutputs regularly."""
        config = self.config
        for machine in list(self.factory.machines.values()):
            if machine.live and machine.record.mjf_transport == "nfs":
                mt = config.machinetypes.get(machine.record.machinetype)
                self.boundary.enforce_limits(machine, mt.heartbeat_file if mt else None)


#: slots 0..251 map to 169.254.169.1-.252; .253 and .254 are the MJF and metadata addresses
MAX_SLOTS = 252


def current_config(source) -> Callable[[], object]:
    """A callable giving ``source``'s configuration in force (``source.current``), for the
    collaborators that read it at each use (a reload takes effect without rewiring)."""
    return functools.partial(getattr, source, "current")


def network_spec(config) -> NetworkSpec:
    """The private VM network. Its DHCP table always lists every possible slot with a generic
    name, so every configuration on a host describes the same network and changing
    total_processors (or running a second configuration, as tests do) never makes
    ensure_network "repair" it under running VMs."""
    s = config.settings
    if s.total_processors > MAX_SLOTS:
        raise VacFactoryError(f"total_processors above {MAX_SLOTS} does not fit the 169.254.169.0/24 VM network")
    hosts = tuple((slot_mac(slot), slot_ip(slot), f"vm-{slot:03d}") for slot in range(MAX_SLOTS))
    return NetworkSpec(
        name=s.network_name,
        bridge=s.network_bridge,
        address=METADATA_ADDRESS,
        prefix=24,
        dhcp_hosts=hosts,
        extra_addresses=(MJF_ADDRESS,),
        forward="nat",
        forward_dev=s.forward_dev,
    )


def describe_hypervisor(hypervisor: Hypervisor, domain_type: str) -> str:
    """The machinefeatures `hypervisor` value; empty if libvirtd cannot be asked right now."""
    try:
        return f"{hypervisor.describe()} {domain_type}"
    except HypervisorError as error:
        log.warning("cannot describe the hypervisor for machinefeatures: %s", error)
        return ""


def make_exporter(config):
    from vacfactory.vmio import exports

    kind = config.settings.nfs_exporter
    if kind == "ganesha":
        state = config.settings.state_dir
        return exports.GaneshaExporter(
            config_path=os.path.join(state, "ganesha", "ganesha.conf"),
            pid_file=os.path.join(state, "ganesha", "ganesha.pid"),
            log_path=os.path.join(state, "ganesha", "ganesha.log"),
            bind_address=METADATA_ADDRESS,
        )
    if kind == "exportfs":
        # the machines directory marks our kernel exports, so that after a restart reconcile()
        # withdraws those of VMs that ended while the daemon was down
        return exports.ExportfsExporter(
            managed_prefix=os.path.join(config.settings.state_dir, "machines"))
    return exports.NullExporter()


def make_jobfs(config) -> JobOutputsFS:
    """Size-limited joboutputs filesystems, only where VMs write over NFS (an exporter)."""
    s = config.settings
    kind = s.joboutputs_nfs_filesystem if s.nfs_exporter != "none" else "none"
    return JobOutputsFS(kind, joboutputs_limits(config))


def joboutputs_limits(config) -> JobOutputsLimits:
    s = config.settings
    return JobOutputsLimits(
        max_file_bytes=s.joboutputs_max_file_bytes,
        max_total_bytes=s.joboutputs_max_total_bytes,
        max_files=s.joboutputs_max_files,
    )


def notify_systemd(state: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET, if systemd gave one.

    A path or '@name' (the abstract namespace), as in sd_notify(3). The send never blocks:
    with systemd's queue full (systemd busy or wedged) a blocking send would stall the engine
    and even its stop on SIGTERM, so the notification is dropped instead.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(path)
            sock.send(state.encode())
    except OSError as error:  # BlockingIOError: systemd's queue is full
        log.debug("systemd notify %s failed: %s", state, error)


def run_foreground(sources: ConfigSources, seconds: Optional[float] = None) -> None:
    """`vacfactory run`: start, run until a signal (or ``seconds``), stop cleanly."""
    daemon = Daemon(sources)
    daemon.install_signal_handlers()
    daemon.start()
    deadline = time.monotonic() + seconds if seconds else None
    try:
        daemon.run(until=(lambda: time.monotonic() >= deadline) if deadline else None)
    finally:
        daemon.close()


