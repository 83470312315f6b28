"""The online part of ``config check --online``: libvirt, ports and host names, asked for real.

Each probe is bounded in time (a hung libvirtd or a slow resolver cannot hang the command)
and changes nothing: ports are tested by binding a socket and closing it at once. When the
daemon of this state directory runs, it holds its ports, so they are not tested.
"""

from __future__ import annotations

import difflib
import errno
import os
import socket
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Sequence, Tuple

from vacfactory.config.model import Config
from vacfactory.config import options as table
from vacfactory.config.parsers import is_url

from .findings import ERROR, NOTE, WARNING, Finding, Locator

#: how long libvirt may take to answer, and all name lookups together
LIBVIRT_TIMEOUT = 5.0
RESOLVE_TIMEOUT = 5.0
#: URIs admins mean; a near miss gets a "did you mean"
KNOWN_URIS = ("qemu:///system", "qemu:///session", "test:///default", "lxc:///system", "xen:///system")
#: the addresses the factory serves VMs on (daemon.py): a syslog_server there is received locally
_FACTORY_ADDRESSES = ("169.254.169.253", "169.254.169.254")


def libvirt(config: Config, locator: Locator, timeout: float = LIBVIRT_TIMEOUT) -> List[Finding]:
    """libvirt answers at libvirt_uri (read-only, one round trip)."""
    from vacfactory.view.monitoring import answer_within

    uri = config.settings.libvirt_uri
    try:
        from vacfactory.hypervisor.libvirt_hv import ping_read_only
    except ImportError as error:
        why: Optional[str] = f"the libvirt Python binding cannot be imported: {error}"
    else:
        why = answer_within(lambda: ping_read_only(uri), timeout)
    if why is None:
        return []
    if why.startswith(f"{uri}: "):
        why = why[len(uri) + 2:]
    near = difflib.get_close_matches(uri, [u for u in KNOWN_URIS if u != uri], n=1, cutoff=0.8)
    hint = f" (did you mean {near[0]}?)" if near and near[0] not in why else ""
    return [locator.finding(ERROR, f"{uri} does not answer: {why}{hint}: the daemon cannot create or "
                                   "see any VM", table.SETTINGS, "libvirt_uri")]


# --------------------------------------------------------------------------- ports


def daemon_pid(state_dir: str) -> Optional[int]:
    """The pid of the daemon running on ``state_dir`` (-1: running, pid unknown), or None."""
    from vacfactory.state.lock import StateLock

    try:
        return StateLock(state_dir).holder()
    except OSError:
        return None


def wanted_ports(config: Config) -> List[Tuple[str, str, int, str]]:
    """(option, protocol, port, what) of every port the daemon binds."""
    s = config.settings
    ports = [("http_port", "tcp", s.http_port, "the MJF and metadata HTTP server"),
             ("udp_port", "udp", s.udp_port, "the VacQuery responder")]
    if s.metrics_port:
        ports.append(("metrics_port", "tcp", s.metrics_port, "the /metrics endpoint and status page"))
    host, _, port = (s.syslog_server or "").rpartition(":")
    if host in _FACTORY_ADDRESSES and port.isdigit():
        ports.append(("syslog_server", "udp", int(port), "the VMs' syslog receiver"))
    return ports


def ports(config: Config, locator: Locator) -> List[Finding]:
    """Each port the daemon binds is free (tested by binding it, then closing at once)."""
    pid = daemon_pid(config.settings.state_dir)
    if pid is not None:
        running = f"pid {pid}" if pid > 0 else "pid unknown"
        return [locator.finding(NOTE, f"the daemon runs on this state directory ({running}); its ports "
                                      "were not tested (it holds them)", table.SETTINGS, table.STATE_DIR)]
    findings: List[Finding] = []
    for option, protocol, port, what in wanted_ports(config):
        why = bind_problem(protocol, port)
        if why is None:
            continue
        severity = ERROR if why[0] == errno.EADDRINUSE else WARNING
        message = f"{protocol.upper()} port {port} for {what}: {why[1]}"
        findings.append(locator.finding(severity, message, table.SETTINGS, option))
    return findings


def bind_problem(protocol: str, port: int) -> Optional[Tuple[int, str]]:
    """(errno, why) if ``port`` cannot be bound on every address now; None if it is free.

    TCP uses SO_REUSEADDR, as servers do, so a connection in TIME_WAIT does not count as a
    user, while any listener on any address of the port does."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    address = "127.0.0.1" if protocol == "tcp" and port == 0 else "0.0.0.0"
    with socket.socket(socket.AF_INET, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as error:
            code = error.errno or 0
            if code == errno.EADDRINUSE:
                return code, "in use by another program: the daemon cannot serve it"
            if code == errno.EACCES:
                return code, (f"cannot be tested as uid {os.geteuid()} (ports below 1024 need root); "
                              "run the check as root")
            return code, f"cannot be bound: {error.strerror or error}"
    return None


# --------------------------------------------------------------------------- host names


def host_names(config: Config, locator: Locator, timeout: float = RESOLVE_TIMEOUT) -> List[Finding]:
    """Host names the daemon will look up: vacuum pipe servers, root_image and user_data
    servers, and the other factories of the space."""
    from vacfactory.config.pipeload import pipe_cache_path

    wanted: List[Tuple[str, str, str, str, str]] = []  # host, severity, section, option, consequence
    for prefix, pipe in config.vacuum_pipes.items():
        host = _url_host(pipe.url)
        if host:
            if os.path.isfile(pipe_cache_path(config.settings.state_dir, prefix)):
                wanted.append((host, WARNING, f"{table.VACUUM_PIPE} {prefix}", "vacuum_pipe_url",
                               "the cached copy stays in use until it resolves"))
            else:
                wanted.append((host, ERROR, f"{table.VACUUM_PIPE} {prefix}", "vacuum_pipe_url",
                               "the pipe is never fetched and defines no machinetypes"))
    for name, mt in config.machinetypes.items():
        if not (mt.startable and mt.target_share > 0):
            continue
        for option in ("root_image", "user_data"):
            host = _url_host(getattr(mt, option) or "")
            if host:
                wanted.append((host, WARNING, f"{table.MACHINETYPE} {name}", option,
                               "it cannot be downloaded (a cached copy would stay in use)"))
    for factory in config.settings.factories:
        if factory != ".":
            wanted.append((factory, WARNING, table.SETTINGS, "factories",
                           "that factory is never asked and counts as unknown"))
    answers = resolve_all(sorted({w[0] for w in wanted}), timeout)
    findings: List[Finding] = []
    for host, severity, section, option, consequence in wanted:
        why = answers.get(host)
        if why:
            findings.append(locator.finding(severity, f"{host} does not resolve ({why}): {consequence}",
                                            section, option))
    return findings


def _url_host(value: str) -> Optional[str]:
    if not value or not is_url(value):
        return None
    parts = urllib.parse.urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        return None
    return parts.hostname


def resolve_all(hosts: Sequence[str], timeout: float) -> Dict[str, str]:
    """host -> why it does not resolve ("" when it does), all looked up at once, within
    ``timeout`` seconds in total (getaddrinfo itself cannot be interrupted)."""
    answers: Dict[str, str] = {}
    lock = threading.Lock()

    def look_up(host: str) -> None:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            why = ""
        except (socket.gaierror, UnicodeError) as error:
            why = str(error.args[1]) if len(error.args) > 1 else str(error)
        except OSError as error:
            why = error.strerror or str(error)
        with lock:
            answers[host] = why

    threads = [threading.Thread(target=look_up, args=(h,), name="vacfactory-check-dns", daemon=True)
               for h in hosts]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        result = dict(answers)
    for host in hosts:
        result.setdefault(host, f"no answer within {timeout:g} s")
    return result


def predict_online(config: Config, locator: Locator) -> List[Finding]:
    """Every online finding."""
    from .containers import container_runtime

    return libvirt(config, locator) + container_runtime(config, locator) + ports(config, locator) \
        + host_names(config, locator)
