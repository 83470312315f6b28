"""The libvirt implementation of :class:`~vacfactory.hypervisor.base.Hypervisor`.

Connections are opened lazily and reopened after an outage: when libvirtd goes away, the
call that notices raises :class:`HypervisorError` naming the URI and drops the connection;
the next call reconnects and registers for lifecycle events again (tested against a private
libvirtd that the test stops and starts). A libvirtd restart therefore looks to the engine
like a few failed cycles, never like a crash. Events that happen while the daemon is down are
lost, and events resume only at the next call (any call, e.g. the periodic ``list_domains``);
the engine's periodic reconcile covers both. Keepalive (5 s x 3) and a close callback make a
remote connection notice a dead or hung daemon; the in-process test driver has neither.

Process-wide, once (libvirt has one error handler and one event loop per process):

- an error handler that sends libvirt's own messages to our logger at DEBUG level instead
  of stderr (otherwise every lookup of a transient domain that just vanished prints
  ``libvirt: QEMU Driver error : Domain not found``);
- libvirt's default event loop implementation, registered before any connection is opened
  (connections opened earlier never deliver events) and run in a daemon thread.

Facts measured on this project's machine (libvirt 9.0, libvirt-python 12.8, QEMU 7.2 TCG):

- qemu emits RESUMED then STARTED when ``createXML`` returns, SHUTDOWN (detail GUEST) when the
  guest powers off, and STOPPED (detail SHUTDOWN) about 1.4 s later when qemu has exited.
  Reading ``info()`` from inside the SHUTDOWN callback works: the final CPU time is there
  (e.g. 4.8 CPU-s for the tiny guest), so ``DomainEvent.cpu_seconds`` is filled in.
  This needs the separate event connection (see :class:`LibvirtHypervisor`); measured on
  one shared connection, the read waited for the engine's concurrent createXML and found the
  domain gone (or reported SHUTOFF with 0 ns, which we treat as "not available"). With it,
  the read succeeded in all but one of about 30 guest power-offs (one at a time and 6 at
  once) on this busy shared machine; it is best effort, and ``None`` means "use your last
  observation".
- ``destroy()`` sends qemu SIGTERM, which qemu reports as a shutdown too: the events are
  SHUTDOWN (detail HOST), then STOPPED (detail DESTROYED), both arriving when destroy returns
  (1.2-2 s). That SHUTDOWN also maps to kind ``shutdown`` but has ``cpu_seconds=None``: libvirt
  holds the domain while it kills qemu, so its CPU time cannot be read any more. The engine
  knows which VMs it destroyed; it should read ``domain_info`` before destroying.
- The ``test:///default`` driver's state is one per process and shared: every open
  connection to it in the same process sees the same domains (not other processes). It is
  reset to the built-in default (one domain called "test") when the last reference to a
  connection goes away (a live virDomain object counts as one). Tests must therefore use
  unique names and UUIDs and destroy what they create, and must not rely on the state
  surviving a close.
- ``createXML`` with ``VIR_DOMAIN_START_VALIDATE`` costs about 30 ms (the RNG schema is loaded
  each time): 1.4 ms vs 31 ms per test-driver domain. It guards against a typo in our XML
  generator, so it runs once per domain *shape* (which elements and devices the XML has);
  values are checked by VMSpec itself. Filling 64 slots would otherwise spend ~1 s on it.
- The test driver emits lifecycle events: STARTED (detail BOOTED) on ``createXML`` and
  STOPPED (detail DESTROYED) on ``destroy``, delivered to every registered connection.
- ``destroy()`` of a running TCG domain takes 1.2-2.3 s (libvirt waits for qemu to exit).
- A ``clean-traffic`` filterref in the domain costs about 1.1 s per ``createXML`` (1.5 s
  instead of 0.45 s): libvirt instantiates the filter's ebtables/iptables rules at every start
  and removes them at every stop. A binding on a persistent tap (``nwfilterBindingCreateXML``
  while the tap exists; its rules stay while the tap does, across domains) costs that once,
  and an ``<interface type='ethernet'>`` with ``managed='no'`` on that tap starts in 0.45 s
  with the same rules in force. A binding made while its tap does not exist instantiates
  nothing, so the tap comes first (see ``_ensure_port``).
- ``list_domains`` with 128 (paused) qemu domains: 18-26 ms as ``listAllDomains`` +
  ``info()``; ``getAllDomainStats`` (state, cpu, vcpu, balloon) took 450-560 ms.
- The test driver's ``info()`` returns the time of day as CPU time (and its
  ``getAllDomainStats`` only knows the ``state`` group); so on a test connection we report
  ``cpu_seconds = 0.0``: there is no CPU accounting to report.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, List, Optional, Set, Tuple

import libvirt

from ..errors import HypervisorError
from . import network as net
from . import provision
from .base import DomainEvent, DomainInfo, DomainState, InterfaceSpec, VMSpec, check_uuid
from .domainxml import domain_xml

log = logging.getLogger(__name__)

__all__ = ["LibvirtHypervisor"]

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.OTHER,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,  # idle vCPUs: still a running VM
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.RUNNING,  # shutting down, not yet off
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PAUSED,  # suspended by the guest: no progress
}

_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
}

#: errors that mean the connection itself is gone, not that one call failed
_CONNECTION_ERRORS = frozenset(
    code
    for code in (
        getattr(libvirt, "VIR_ERR_NO_CONNECT", None),
        getattr(libvirt, "VIR_ERR_INVALID_CONN", None),
        getattr(libvirt, "VIR_ERR_RPC", None),
        getattr(libvirt, "VIR_ERR_AUTH_FAILED", None),
    )
    if code is not None
)

#: keepalive: probe every 5 s, give up after 3 unanswered probes (a hung daemon, not a dead one)
_KEEPALIVE_INTERVAL = 5
_KEEPALIVE_COUNT = 3

_loop_lock = threading.Lock()
_loop_thread: Optional[threading.Thread] = None


def _libvirt_error_handler(_ctx: Any, err: Any) -> None:
    """Keep libvirt's messages out of stderr; the caller turns failures into exceptions."""
    try:
        log.debug("libvirt: %s", err[2])
    except (IndexError, TypeError):
        log.debug("libvirt: %r", err)


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as exc:
            log.error("libvirt event loop iteration failed: %s", exc)
            time.sleep(1.0)


def start_event_loop() -> None:
    """Install the error handler and start libvirt's event loop thread, once per process."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.registerErrorHandler(_libvirt_error_handler, None)
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        thread.start()
        _loop_thread = thread


def _code(exc: libvirt.libvirtError) -> Optional[int]:
    return exc.get_error_code()


def _message(exc: libvirt.libvirtError) -> str:
    return exc.get_error_message() or str(exc)


class LibvirtHypervisor:
    """A :class:`Hypervisor` on one libvirt URI (``qemu:///system``, ``test:///default``...).

    Two connections to the same URI: one for the calls the engine makes, and one that only
    receives lifecycle events (opened once a callback is set). The remote driver serialises
    the calls of one connection, so an event callback that reads the final CPU time on the
    calling connection waits for whatever create or destroy is in flight (0.5-2 s), by
    which time the domain is gone: measured, this lost the CPU time and delayed every event.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._lock = threading.RLock()
        self._conn: Optional[libvirt.virConnect] = None
        self._events: Optional[libvirt.virConnect] = None
        self._event_id: Optional[int] = None
        self._is_test = False
        self._callback: Optional[Callable[[DomainEvent], None]] = None
        self._validated_shapes: Set[Tuple] = set()
        #: idle connections for creations running in parallel (see create)
        self._spares: List[libvirt.virConnect] = []
        start_event_loop()

    # -- connections -----------------------------------------------------------------------

    def _connection(self) -> libvirt.virConnect:
        """The live calling connection, (re)opened if need be; the event connection too."""
        with self._lock:
            conn = self._conn
            if conn is None or not self._alive(conn):
                if conn is not None:
                    log.warning("%s: connection lost, reconnecting", self.uri)
                    self._discard(conn)
                conn = self._open()
                try:
                    self._is_test = conn.getType().upper() == "TEST"
                except libvirt.libvirtError as exc:
                    self._close_quietly(conn)
                    message = f"connection failed: {_message(exc)}"
                    raise HypervisorError(message, uri=self.uri) from exc
                self._conn = conn
                log.info("%s: connected", self.uri)
            if self._callback is not None:
                self._event_connection()
            return conn

    def _event_connection(self) -> None:
        """Make sure the event connection is open and registered (after an outage: again)."""
        events = self._events
        if events is not None and self._alive(events):
            return
        if events is not None:
            self._drop_events()
        events = self._open()
        try:
            self._event_id = events.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
        except libvirt.libvirtError as exc:
            self._close_quietly(events)
            message = f"cannot register for events: {_message(exc)}"
            raise HypervisorError(message, uri=self.uri) from exc
        self._events = events
        log.info("%s: receiving lifecycle events", self.uri)

    def _open(self) -> libvirt.virConnect:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect: {_message(exc)}", uri=self.uri) from exc
        # keepalive and a close callback detect a dead or hung daemon sooner where the driver
        # has them (remote URIs such as qemu:///system; the in-process test driver has not)
        try:
            conn.setKeepAlive(_KEEPALIVE_INTERVAL, _KEEPALIVE_COUNT)
        except libvirt.libvirtError as exc:
            log.debug("%s: no keepalive: %s", self.uri, _message(exc))
        try:
            conn.registerCloseCallback(self._on_close, None)
        except libvirt.libvirtError as exc:
            log.debug("%s: no close callback: %s", self.uri, _message(exc))
        return conn

    @staticmethod
    def _alive(conn: libvirt.virConnect) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _discard(self, conn: libvirt.virConnect) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
        self._close_quietly(conn)

    def _drop_events(self) -> None:
        with self._lock:
            events, self._events = self._events, None
            event_id, self._event_id = self._event_id, None
        if events is None:
            return
        if event_id is not None and self._alive(events):
            try:
                events.domainEventDeregisterAny(event_id)
            except libvirt.libvirtError as exc:
                log.debug("%s: deregistering events: %s", self.uri, _message(exc))
        self._close_quietly(events)

    def _close_quietly(self, conn: libvirt.virConnect) -> None:
        try:
            conn.close()
        except libvirt.libvirtError as exc:
            log.debug("%s: closing a dead connection: %s", self.uri, _message(exc))

    def _on_close(self, conn: libvirt.virConnect, reason: int, _opaque: Any) -> None:
        # Called from the event thread. Only log: the next call sees isAlive() false and
        # reconnects; closing the connection from inside its own close callback is not allowed.
        log.warning("%s: connection closed by libvirt (reason %d)", self.uri, reason)

    def _error(
        self,
        conn: libvirt.virConnect,
        exc: libvirt.libvirtError,
        what: str,
        domain: Optional[str] = None,
    ) -> HypervisorError:
        """Turn a libvirtError into HypervisorError, dropping the connection if it is dead."""
        if _code(exc) in _CONNECTION_ERRORS or not self._alive(conn):
            self._discard(conn)
            what += " (connection lost, will reconnect)"
        message = f"{what} on {self.uri}: {_message(exc)}"
        return HypervisorError(message, domain=domain, uri=self.uri)

    # -- the Hypervisor interface ----------------------------------------------------------

    def create(self, spec: VMSpec) -> None:
        """Make the spec's disks and slot port, then start it as a transient domain (it
        vanishes when it stops).

        Thread-safe: each concurrent creation uses a connection of its own from a small pool
        (measured here, 8 TCG domains: 8.7 s one createXML after another, 2.6 s from 8 threads
        on one connection, 1.8 s on separate connections).
        """
        xml = domain_xml(spec)
        self._connection()  # reconnects (and re-registers for events) after an outage
        started = time.monotonic()
        provision.make_disks(spec)
        conn = self._creation_connection()
        try:
            self._start(conn, spec, xml)
        except BaseException:
            # not reused after a failure (a second close of one _error closed is harmless);
            # closed now, since the exception's traceback would keep it (and the test driver's
            # state) alive until the garbage collector runs
            self._close_quietly(conn)
            raise
        with self._lock:
            self._spares.append(conn)
        log.info(
            "%s: created domain %s (%s, %d vCPU, %d MiB) in %.2f s",
            spec.name, spec.uuid, spec.domain_type, spec.vcpus, spec.memory_mib,
            time.monotonic() - started,
        )

    def _start(self, conn: libvirt.virConnect, spec: VMSpec, xml: str) -> None:
        if spec.interface is not None and spec.interface.port is not None:
            self._ensure_port(conn, spec.interface, spec.name)
        try:
            # VALIDATE (once per shape): a typo in our XML fails instead of being ignored
            shape = spec_shape(spec)
            flags = 0 if shape in self._validated_shapes else libvirt.VIR_DOMAIN_START_VALIDATE
            conn.createXML(xml, flags)
            self._validated_shapes.add(shape)
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc, "create failed", spec.name) from exc

    def _creation_connection(self) -> libvirt.virConnect:
        """A spare connection for one creation (opened when every spare is in use)."""
        with self._lock:
            while self._spares:
                conn = self._spares.pop()
                if self._alive(conn):
                    return conn
                self._close_quietly(conn)
        return self._open()

    def remove_disks(self, directory: str) -> None:
        """Delete the disk images in a VM's ``disks/`` directory once its domain is gone."""
        provision.remove_disks(directory)

    def _ensure_port(self, conn: libvirt.virConnect, iface: InterfaceSpec, name: str) -> None:
        """The slot's tap on its network's bridge with clean-traffic bound for exactly its MAC
        and IP, before the domain may start (else creation fails: never an unfiltered NIC).

        Made once per slot (about 1.2 s, the filter's rules); afterwards two lookups (~2 ms).
        """
        port, mac, ip = iface.port, iface.mac.lower(), iface.ip
        try:
            bridge = conn.networkLookupByName(iface.network).bridgeName()
            created = net.ensure_tap(port, bridge)
            try:
                binding = conn.nwfilterBindingLookupByPortDev(port)
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_NO_NWFILTER_BINDING:
                    raise
                binding = None
            want = (port, mac, net.SLOT_FILTER, frozenset([ip]))
            if binding is not None:
                # a new tap has none of the old rules: bind again
                if not created and net.binding_facts(binding.XMLDesc(0)) == want:
                    return
                binding.delete()
            began = time.monotonic()
            conn.nwfilterBindingCreateXML(net.binding_xml(port, mac, ip), 0)
            log.info("%s: %s bound to %s for %s %s (%.2f s)", name, net.SLOT_FILTER, port, mac, ip,
                     time.monotonic() - began)
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc, f"slot port {port}", name) from exc

    def destroy(self, uuid: str) -> bool:
        """Hard stop; False if there was no running domain with this UUID.

        Synchronous: libvirt sends qemu SIGTERM (SIGKILL after 10 s) and waits for it to exit,
        1.2-2.3 s for a TCG domain here.
        """
        uuid = check_uuid(uuid)
        conn = self._connection()
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise self._error(conn, exc, "lookup for destroy failed", uuid) from exc
        name = dom.name()
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            # gone in between, or a defined domain that is not running: nothing to stop
            if _code(exc) in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                return False
            raise self._error(conn, exc, "destroy failed", name) from exc
        log.info("%s: destroyed domain %s", name, uuid)
        return True

    def list_domains(self) -> List[DomainInfo]:
        """Every domain: ``listAllDomains`` then ``info()`` per domain.

        Measured with 128 domains on qemu:///system: 18-26 ms in all. ``getAllDomainStats``
        is one call but far slower (450-560 ms with the cpu, vcpu and balloon groups: the
        cpu group alone costs about 1.7 ms a domain), so it is not used.
        """
        conn = self._connection()
        try:
            domains = conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc, "listing domains failed") from exc
        result = []
        for dom in domains:
            info = self._from_info(conn, dom)
            if info is not None:
                result.append(info)
        return result

    def _from_info(self, conn: libvirt.virConnect, dom: libvirt.virDomain) -> Optional[DomainInfo]:
        try:
            state, _max_kib, mem_kib, vcpus, cpu_ns = dom.info()
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # a transient domain that ended a moment ago
            raise self._error(conn, exc, "domain info failed", dom.name()) from exc
        return DomainInfo(
            name=dom.name(),
            uuid=dom.UUIDString(),
            state=_STATES.get(state, DomainState.OTHER),
            cpu_seconds=0.0 if self._is_test else cpu_ns / 1e9,
            vcpus=int(vcpus),
            memory_kib=int(mem_kib),
        )

    def domain_info(self, uuid: str) -> Optional[DomainInfo]:
        """One domain, or None if there is none with this UUID."""
        uuid = check_uuid(uuid)
        conn = self._connection()
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._error(conn, exc, "lookup failed", uuid) from exc
        return self._from_info(conn, dom)

    def set_event_callback(self, callback: Callable[[DomainEvent], None]) -> None:
        """Deliver lifecycle events to ``callback`` from now on (from the event thread).

        The connection is opened now if possible, so events flow before the first other call.
        """
        with self._lock:
            self._callback = callback
        try:
            self._connection()
        except HypervisorError as exc:
            log.warning("%s: events will start when libvirt is reachable: %s", self.uri, exc)

    def _on_lifecycle(
        self, _conn: Any, dom: libvirt.virDomain, event: int, detail: int, _opaque: Any
    ) -> None:
        """Runs in the event thread: never raise into libvirt's loop."""
        kind = _EVENTS.get(event, "other")
        cpu_seconds = None
        if (
            event == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN
            and detail != libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_HOST
            and not self._is_test
        ):
            # The guest has powered off but qemu has not exited yet (1.2-1.8 s under TCG):
            # the last moment the final CPU time of a transient domain can be read. Not for
            # a host-initiated shutdown (our destroy): libvirt holds the domain until qemu is
            # dead, so the read would only stall this thread and then find nothing.
            try:
                state, _max_kib, _kib, _vcpus, cpu_ns = dom.info()
                # a domain already torn down reports SHUTOFF and 0 ns: that is no answer
                if state != libvirt.VIR_DOMAIN_SHUTOFF and cpu_ns > 0:
                    cpu_seconds = cpu_ns / 1e9
                else:
                    log.debug("%s: no final CPU time: state %d, %d ns", dom.name(), state, cpu_ns)
            except libvirt.libvirtError as exc:
                log.debug("%s: no final CPU time: %s", dom.name(), _message(exc))
        try:
            domain_event = DomainEvent(
                uuid=dom.UUIDString(), name=dom.name(), kind=kind, time=time.time(),
                cpu_seconds=cpu_seconds,
            )
        except libvirt.libvirtError as exc:
            log.warning("lifecycle event %d/%d for an unreadable domain: %s", event, detail, exc)
            return
        log.debug("%s: event %s (libvirt %d/%d)", domain_event.name, kind, event, detail)
        callback = self._callback
        if callback is None:
            return
        try:
            callback(domain_event)
        except Exception:  # noqa: BLE001 - an engine bug must not kill libvirt's event thread
            log.exception("%s: event callback failed for %s", domain_event.name, kind)

    def describe(self) -> str:
        """The hypervisor in one line for VMs' machinefeatures, e.g. "QEMU 7.2.0 libvirt 9.0.0"."""
        conn = self._connection()
        try:
            kind, version, lib = conn.getType(), conn.getVersion(), conn.getLibVersion()
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc, "describe failed") from exc
        return f"{kind} {_version(version)} libvirt {_version(lib)}"

    def ping(self) -> bool:
        """True if libvirtd answers a round trip now (reconnecting if needed)."""
        try:
            conn = self._connection()
        except HypervisorError as exc:
            log.debug("%s: ping: %s", self.uri, exc)
            return False
        try:
            conn.getLibVersion()
        except libvirt.libvirtError as exc:
            log.debug("%s", self._error(conn, exc, "ping failed"))
            return False
        return True

    def ensure_network(self, spec: net.NetworkSpec) -> None:
        """Create the private network, or repair it if it differs from ``spec`` or is down.

        - missing: define, start, autostart;
        - inactive, transient, or a different forward mode, bridge or address: destroy,
          undefine, define again and start (a stale bridge left by a crash is removed);
        - only the DHCP hosts differ (the number of slots changed): if VMs are attached,
          update the running network in place so they stay connected (destroying a network
          detaches its VMs for good); else, or if the update fails, redefine it;
        - then every extra address is put on the bridge if it is missing.

        Idempotent; when nothing needs doing it costs a few libvirt calls and one ``ip`` run
        (measured 3-10 ms).
        """
        conn = self._connection()
        try:
            network = self._lookup_network(conn, spec.name)
            if network is not None:
                xml = network.XMLDesc(0)
                problems = net.network_problems(spec, xml, dhcp=False)
                if not network.isActive():
                    problems.append("inactive")
                if not network.isPersistent():
                    problems.append("transient")
                if not problems and not self._update_dhcp_hosts(spec, network, xml):
                    problems.append("DHCP hosts differ")
                if problems:
                    log.warning("network %s: repairing: %s", spec.name, "; ".join(problems))
                    self._remove_network(network)
                    network = None
            if network is None:
                self._start_network(conn, spec)
            elif not network.autostart():
                network.setAutostart(1)
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc, f"network {spec.name}") from exc
        present = net.bridge_addresses(spec.bridge)
        for address in spec.extra_addresses:
            if address not in present:
                net.add_bridge_address(spec.bridge, address)
        # a restarted network has a new bridge: put the slot ports of running VMs back on it
        # (idle ones are put on their VM's bridge when the slot is next used)
        for port in net.held_ports(""):
            net.ensure_tap(port, spec.bridge)

    @staticmethod
    def _update_dhcp_hosts(spec: net.NetworkSpec, network: libvirt.virNetwork, xml: str) -> bool:
        """Bring the DHCP hosts of a running network in line; False means "redefine it".

        Each in-place change restarts dnsmasq (measured 0.6-0.7 s per host), so a network with
        no VM attached is simply redefined (0.5 s in all) instead.
        """
        remove, add = net.dhcp_host_changes(spec, xml)
        if not remove and not add:
            return True
        if not network.listAllPorts(0) and not net.held_ports(spec.bridge):
            return False
        flags = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
        section = libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST
        try:
            for host in remove:
                network.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, section, -1,
                               net.dhcp_host_xml(host), flags)
            for host in add:
                network.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, section, -1,
                               net.dhcp_host_xml(host), flags)
        except libvirt.libvirtError as exc:
            log.warning("network %s: DHCP host update failed: %s", spec.name, _message(exc))
            return False
        log.info("network %s: DHCP hosts updated in place (%d removed, %d added)",
                 spec.name, len(remove), len(add))
        return True

    @staticmethod
    def _remove_network(network: libvirt.virNetwork) -> None:
        persistent = network.isPersistent()  # a transient network is gone once destroyed
        if network.isActive():
            network.destroy()
        if persistent:
            network.undefine()

    @staticmethod
    def _lookup_network(conn: libvirt.virConnect, name: str) -> Optional[libvirt.virNetwork]:
        try:
            return conn.networkLookupByName(name)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_NETWORK:
                return None
            raise

    def _start_network(self, conn: libvirt.virConnect, spec: net.NetworkSpec) -> None:
        """Define, start and autostart; a stale bridge left by a crash is removed first."""
        if net.link_kind(spec.bridge) is not None and not self._bridge_claimed(conn, spec):
            net.delete_bridge(spec.bridge)
        network = conn.networkDefineXML(net.network_xml(spec))
        network.create()
        network.setAutostart(1)
        log.info("network %s: defined and started on %s (%s/%d)",
                 spec.name, spec.bridge, spec.address, spec.prefix)

    @staticmethod
    def _bridge_claimed(conn: libvirt.virConnect, spec: net.NetworkSpec) -> bool:
        """Does another libvirt network use the bridge named in ``spec``."""
        for other in conn.listAllNetworks(0):
            if other.name() == spec.name:
                continue
            try:
                if other.bridgeName() == spec.bridge:
                    return True
            except libvirt.libvirtError:
                continue  # networks without a bridge (macvtap, hostdev) have no name to clash
        return False

    def close(self) -> None:
        """Close both connections; a later call opens new ones (and keeps the callback)."""
        self._drop_events()
        with self._lock:
            conn, self._conn = self._conn, None
            spares, self._spares = self._spares, []
        for spare in spares:
            self._close_quietly(spare)
        if conn is not None:
            self._close_quietly(conn)
            log.info("%s: closed", self.uri)


def spec_shape(spec: VMSpec) -> Tuple:
    """What decides the structure of ``domain_xml(spec)``, without the values."""
    return (
        spec.domain_type,
        spec.cpu_mode,
        spec.boot,
        spec.kernel is not None,
        spec.initrd is not None,
        spec.cmdline is not None,
        spec.console_log is not None,
        tuple((d.device, d.bus, d.fmt, d.readonly) for d in spec.disks),
        None if spec.interface is None else (spec.interface.anti_spoofing, spec.interface.port is not None),
        tuple(f.readonly for f in spec.filesystems),
    )


def _version(number: int) -> str:
    """libvirt's version numbers: major * 1,000,000 + minor * 1,000 + release."""
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def ping_read_only(uri: str) -> str:
    """Open ``uri`` read-only, make one round trip, close; return libvirt's version.

    What a monitoring check needs: a read-only connection is all an unprivileged NRPE user
    may get (libvirtd's read-only socket), and it can change nothing. It blocks as long as
    libvirtd does (a hung daemon: for ever), so the caller bounds it. Raises HypervisorError.
    """
    libvirt.registerErrorHandler(_libvirt_error_handler, None)  # not libvirt's stderr lines
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot connect read-only: {_message(exc)}", uri=uri) from exc
    try:
        return _version(conn.getLibVersion())
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"no answer: {_message(exc)}", uri=uri) from exc
    finally:
        try:
            conn.close()
        except libvirt.libvirtError as exc:
            log.debug("%s: closing: %s", uri, _message(exc))
