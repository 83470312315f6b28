"""The container implementation of :class:`~vacfactory.hypervisor.base.Hypervisor`.

It talks to the Docker Engine API (Docker, or Podman's ``podman system service``) with the
``docker`` package, the only module of vacfactory that imports it. A container is the
factory's if it carries the owner label (the factory's name); nothing else on the runtime is
ever listed, stopped or removed. Its UUID, grace period and size are labels too, so a
restarted daemon knows everything it needs from the runtime alone.

A container is a transient domain to the engine: one that has exited is not listed (and is
removed at the next listing; its binds are the factory's directories and stay), and ``destroy`` returns at
once while a thread stops it (SIGTERM, SIGKILL after the grace period) and removes it. A
container being stopped is renamed at once (its slot's name is free for the next machine);
its slot name stays in a label, which is the name it is listed under.

An exited container found by a listing (it ended while nobody followed the events: the
daemon was down) gives a ``stopped`` event that carries the exit time the runtime recorded
(``DomainEvent.at``), so the engine ends it then, not at its last sign of life.

Facts measured on this project's machine (Podman 4.3.1 service, runc, cgroupfs, cgroup v1):

- create + start: 0.12-0.25 s; list of our containers 7 ms.
- CPU time: the one-shot stats call costs 5-13 ms a container; Podman's own multi-container
  stats call (``/libpod/containers/stats``) 9 ms for 8, so it is used when the runtime is
  Podman. Stats of an exited container are not JSON: the final CPU time is the last one seen.
- Podman refuses to stop a paused container ("container state improper"); a kill works.
- Events carry the container's labels as attributes, so the server filters them by owner.
- A pull's errors come inside a 200 stream as ``{"error": ...}``.
- runc cannot give a container an rlimit above the runtime's hard limit without
  CAP_SYS_RESOURCE, and the runtime's defaults can be higher: ``nofile`` and ``nproc`` are
  always set, at most this process's hard limits.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import threading
import time
from datetime import datetime
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from vacfactory.core import values
from vacfactory.errors import HypervisorError, InvalidValue, shorten

from .base import ContainerSpec, DomainEvent, DomainInfo, DomainState, NetworkSpec, check_uuid
from .eventstream import EventFollower
from .pulls import ImagePulls

log = logging.getLogger(__name__)

__all__ = ["ContainerHypervisor", "LABEL_FACTORY", "LABEL_UUID", "LABEL_GRACE", "socket_url"]

DEFAULT_SOCKET = "/var/run/docker.sock"
#: Docker Engine API version spoken: Podman 4 serves 1.41, Docker still accepts it
API_VERSION = "1.41"
LABEL_FACTORY = "org.vacfactory.factory"
LABEL_UUID = "org.vacfactory.uuid"
LABEL_GRACE = "org.vacfactory.grace"
LABEL_PROCESSORS = "org.vacfactory.processors"
LABEL_MEMORY = "org.vacfactory.memory_mib"
#: the slot name (the container's own name changes while it is being stopped)
LABEL_NAME = "org.vacfactory.name"
#: the name a container takes while it is stopped: the slot's name is free at once
STOPPING_SUFFIX = "-stopping-"
DEFAULT_NOFILE = 20000
DEFAULT_NPROC = 4096

#: runtime states of a container that is alive (Podman adds "stopping" to Docker's)
_ALIVE = {"running": DomainState.RUNNING, "restarting": DomainState.RUNNING,
          "stopping": DomainState.RUNNING, "paused": DomainState.PAUSED}
#: made but never started (Podman: configured, initialized)
_NOT_STARTED = frozenset({"created", "configured", "initialized"})
_EVENT_KINDS = {"start": "started", "die": "stopped", "pause": "suspended", "unpause": "resumed"}
#: errors of the API client: the runtime refused, or could not be reached, or sent garbage
_API_ERRORS = (DockerException, requests.exceptions.RequestException, ValueError)
#: a last CPU time not refreshed for this long belongs to a container long gone
_CPU_MEMORY_SECONDS = 3600.0


def socket_url(socket: str) -> str:
    """``unix:///path`` for a socket path or URL."""
    if socket.startswith("unix://"):
        path = socket[len("unix://"):]
    else:
        path = socket
    values.check_absolute_path(path, "container socket")
    return "unix://" + path


def _rlimit(name: str, wanted: Optional[int], which: int, default: int) -> int:
    """A container rlimit: ``wanted`` or ``default``, never above this process's hard limit
    (runc could not set it; see the module's notes)."""
    hard = resource.getrlimit(which)[1]
    ceiling = None if hard == resource.RLIM_INFINITY else hard
    if wanted is None:
        return default if ceiling is None else min(default, ceiling)
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        raise InvalidValue(f"container {name} limit must be a positive integer, got {wanted!r}")
    if ceiling is not None and wanted > ceiling:
        raise InvalidValue(f"container {name} limit {wanted} is above the host's hard limit {ceiling}")
    return wanted


def _label_int(labels: Dict[str, str], key: str, default: int) -> int:
    try:
        return int(labels.get(key, default))
    except (TypeError, ValueError):
        return default


class ContainerHypervisor:
    """A :class:`Hypervisor` for ``ContainerSpec`` on a Docker Engine API socket.

    ``owner`` (the factory's name) labels every container this object makes and limits
    everything it lists, stops and removes to such containers. ``nofile`` and ``nproc`` are
    the rlimits every container gets (default: 20000 and 4096, at most the host's hard limits).
    """

    def __init__(self, socket: str = DEFAULT_SOCKET, owner: str = "vacfactory", *,
                 nofile: Optional[int] = None, nproc: Optional[int] = None,
                 timeout: float = 30.0, pull_retry_seconds: float = 300.0, remove_exited: bool = True) -> None:
        """``remove_exited=False``: an observer (a test's ground truth) that leaves exited
        containers for the factory's own hypervisor to find."""
        self.url = socket_url(socket)
        self.remove_exited = remove_exited
        self.owner = values.check_domain_name(owner, "container owner")
        self.nofile = _rlimit("nofile", nofile, resource.RLIMIT_NOFILE, DEFAULT_NOFILE)
        self.nproc = _rlimit("nproc", nproc, resource.RLIMIT_NPROC, DEFAULT_NPROC)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._client_: Optional[docker.APIClient] = None
        self._podman: Optional[bool] = None
        self._callback: Optional[Callable[[DomainEvent], None]] = None
        self._events: Optional[EventFollower] = None
        self._creating: set = set()
        #: uuid -> (container id, thread) of the containers being stopped by destroy
        self._stopping: Dict[str, Tuple[str, threading.Thread]] = {}
        #: uuid -> (cpu seconds, monotonic time seen): the stop event's final CPU time
        self._last_cpu: Dict[str, Tuple[float, float]] = {}
        #: ids of exited containers this object has reported (removed at the next listing)
        self._exits_reported: set = set()
        self._pulls = ImagePulls(self._pull, retry_seconds=pull_retry_seconds)
        #: False: CPU from per-container stats even on Podman (tests run both ways)
        self.multi_stats = True

    # -- the API client ---------------------------------------------------------------------

    def _new_client(self) -> docker.APIClient:
        """A client of its own (no I/O until used): creations in parallel, the event stream
        and the engine's calls share one pool; stops and pulls, which hold a connection for
        long, each get their own, so close() does not cut them off."""
        try:
            return docker.APIClient(base_url=self.url, version=API_VERSION, timeout=self.timeout, max_pool_size=16)
        except DockerException as exc:
            raise HypervisorError(f"cannot use the socket: {exc}", uri=self.url) from exc

    def _client(self) -> docker.APIClient:
        with self._lock:
            if self._client_ is None:
                self._client_ = self._new_client()
            client = self._client_
            events = self._events
        if events is not None and not events.running():
            events.start()  # after close(): follow again
        return client

    def _error(self, what: str, exc: Exception, domain: Optional[str] = None) -> HypervisorError:
        detail = exc.explanation if isinstance(exc, APIError) and exc.explanation else str(exc)
        return HypervisorError(f"{what} on {self.url}: {shorten(detail, 300)}", domain=domain, uri=self.url)

    def _call(self, what: str, method: Callable[..., Any], *args: Any, domain: Optional[str] = None,
              **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except _API_ERRORS as exc:
            raise self._error(what, exc, domain) from exc

    def _ours(self, *extra: str) -> Dict[str, Any]:
        return {"label": [f"{LABEL_FACTORY}={self.owner}", *extra]}

    def _is_podman(self, client: docker.APIClient) -> bool:
        if self._podman is None:
            version = self._call("version", client.version)
            names = [c.get("Name", "") for c in version.get("Components") or [] if isinstance(c, dict)]
            self._podman = any("podman" in str(n).lower() for n in names)
        return self._podman

    # -- creating ---------------------------------------------------------------------------

    def create(self, spec: ContainerSpec) -> None:
        """Start a container for ``spec``; its image must be present (see image_status)."""
        if not isinstance(spec, ContainerSpec):
            raise HypervisorError(f"not a container: {type(spec).__name__}", domain=getattr(spec, "name", None),
                                  uri=self.url)
        for bind in spec.binds:
            if bind.scratch:  # a private scratch directory (tmp_binds): made here, empty
                try:
                    os.makedirs(bind.source, mode=0o755, exist_ok=True)
                except OSError as error:
                    raise HypervisorError(f"scratch directory {bind.source}: {error.strerror or error}",
                                          domain=spec.name, uri=self.url) from None
            if not os.path.isdir(bind.source) and not os.path.isfile(bind.source):
                # the runtime would make a missing source itself (Docker does), as root
                raise HypervisorError(f"bind source {bind.source} does not exist", domain=spec.name, uri=self.url)
        client = self._client()
        started = time.monotonic()
        with self._lock:
            self._creating.add(spec.uuid)
        try:
            try:
                client.inspect_image(spec.image)
            except ImageNotFound:
                raise HypervisorError(f"image {spec.image} is not present", domain=spec.name, uri=self.url) from None
            except _API_ERRORS as exc:
                raise self._error(f"image {spec.image}", exc, spec.name) from exc
            container_id = self._create_container(client, spec)
            try:
                client.start(container_id)
            except _API_ERRORS as exc:
                self._remove(client, container_id, spec.name)
                raise self._error("start failed", exc, spec.name) from exc
        finally:
            with self._lock:
                self._creating.discard(spec.uuid)
        log.info("%s: created container %s (%s, %d processors, %d MiB) in %.2f s", spec.name, spec.uuid,
                 spec.image, spec.processors, spec.memory_mib, time.monotonic() - started)

    def _create_container(self, client: docker.APIClient, spec: ContainerSpec) -> str:
        host_config = client.create_host_config(
            binds=[f"{b.source}:{b.target}:{'ro' if b.readonly else 'rw'}" for b in spec.binds],
            privileged=False,
            security_opt=["no-new-privileges"],  # seccomp and capabilities: the runtime's defaults
            cpu_shares=spec.processors * 1024,
            mem_limit=spec.memory_mib * 1024 * 1024,
            ulimits=[docker.types.Ulimit(name="nofile", soft=self.nofile, hard=self.nofile),
                     docker.types.Ulimit(name="nproc", soft=self.nproc, hard=self.nproc)],
            auto_remove=False,  # removed once its end has been seen (list_domains, destroy)
            # what it prints would fill the runtime's storage unbounded (Podman 4.3 ignores
            # max-size); a pilot's results come through joboutputs
            log_config=docker.types.LogConfig(type="none"),
        )
        labels = {LABEL_FACTORY: self.owner, LABEL_UUID: spec.uuid, LABEL_NAME: spec.name,
                  LABEL_GRACE: str(spec.stop_grace_seconds),
                  LABEL_PROCESSORS: str(spec.processors), LABEL_MEMORY: str(spec.memory_mib)}
        for attempt in (1, 2):
            try:
                created = client.create_container(
                    spec.image, command=list(spec.command), name=spec.name, hostname=spec.name,
                    labels=labels, host_config=host_config, stdin_open=False, tty=False)
                return created["Id"]
            except APIError as exc:
                # a name clash: 409 from Docker, 500 "already in use" from Podman 4.3
                clash = exc.status_code == 409 or "already in use" in str(exc.explanation)
                if clash and attempt == 1 and self._remove_leftover(client, spec.name):
                    continue
                raise self._error("create failed", exc, spec.name) from exc
            except _API_ERRORS as exc:
                raise self._error("create failed", exc, spec.name) from exc
        raise AssertionError("unreachable")

    def _remove_leftover(self, client: docker.APIClient, name: str) -> bool:
        """Remove a container of ours named ``name`` that is not alive (a start interrupted
        by a crash, an exit not yet listed): the slot's name is free again."""
        try:
            info = client.inspect_container(name)
        except _API_ERRORS:
            return False
        labels = (info.get("Config") or {}).get("Labels") or {}
        status = (info.get("State") or {}).get("Status", "")
        if labels.get(LABEL_FACTORY) != self.owner or status in _ALIVE:
            return False
        log.warning("%s: removing our leftover %s container %s", name, status, labels.get(LABEL_UUID))
        return self._remove(client, info["Id"], name)

    def _remove(self, client: docker.APIClient, container_id: str, name: str) -> bool:
        try:
            client.remove_container(container_id, force=True)
            return True
        except NotFound:
            return True
        except _API_ERRORS as exc:
            log.warning("%s: cannot remove container %s: %s", name, container_id[:12], self._error("remove", exc))
            return False

    # -- images -----------------------------------------------------------------------------

    def image_status(self, reference: str) -> Optional[str]:
        """None if ``reference`` is present; else why not (a background pull is started, at
        most one per reference, and retried after a back-off when it fails). Never waits
        for a pull; HypervisorError when the runtime cannot be reached."""
        values.check_image_reference(reference, "image")
        client = self._client()
        try:
            client.inspect_image(reference)
            return None
        except ImageNotFound:
            return self._pulls.status(reference)
        except _API_ERRORS as exc:
            raise self._error(f"image {reference}", exc) from exc

    def has_image(self, reference: str) -> bool:
        """Is ``reference`` present (no pull is started: `config check` only looks)."""
        values.check_image_reference(reference, "image")
        client = self._client()
        try:
            client.inspect_image(reference)
            return True
        except ImageNotFound:
            return False
        except _API_ERRORS as exc:
            raise self._error(f"image {reference}", exc) from exc

    def _pull(self, reference: str) -> None:
        """Pull in the calling (background) thread; raises unless the image is then present."""
        client = self._new_client()
        try:
            for line in client.pull(reference, stream=True, decode=True):
                if isinstance(line, dict) and line.get("error"):
                    raise HypervisorError(str(line["error"]), uri=self.url)
            client.inspect_image(reference)
        except ImageNotFound:
            raise HypervisorError("the pull ended without the image", uri=self.url) from None
        except _API_ERRORS as exc:
            raise self._error("pull", exc) from exc
        finally:
            client.close()

    # -- listing ----------------------------------------------------------------------------

    def list_domains(self) -> List[DomainInfo]:
        """Our live containers (running, paused); exited ones are removed, not listed.

        One list call and one stats call (Podman) or one per container (Docker).
        """
        client = self._client()
        containers = self._call("listing containers", client.containers, all=True, filters=self._ours())
        with self._lock:  # forget the exits of containers gone meanwhile
            self._exits_reported &= {c.get("Id") for c in containers}
        return self._infos(client, containers)

    def domain_info(self, uuid: str) -> Optional[DomainInfo]:
        uuid = check_uuid(uuid)
        client = self._client()
        containers = self._call("lookup", client.containers, all=True, filters=self._ours(f"{LABEL_UUID}={uuid}"),
                                domain=uuid)
        infos = self._infos(client, containers)
        return infos[0] if infos else None

    def _infos(self, client: docker.APIClient, containers: Iterable[Dict[str, Any]]) -> List[DomainInfo]:
        alive: List[Tuple[Dict[str, Any], str, DomainState]] = []
        with self._lock:
            stopping, creating = set(self._stopping), set(self._creating)
        for container in containers:
            labels = container.get("Labels") or {}
            name = _name(container)
            try:
                uuid = check_uuid(labels.get(LABEL_UUID, ""))
            except InvalidValue:
                log.warning("%s: container %s has our label but no UUID: ignored", name, container.get("Id", "")[:12])
                continue
            status = str(container.get("State", "")).lower()
            if uuid in stopping or status == "removing" or (status in _NOT_STARTED and uuid in creating):
                continue
            if status in _ALIVE:
                alive.append((container, uuid, _ALIVE[status]))
            elif self.remove_exited:  # exited, dead, or never started by a process that died
                self._gone(client, container, uuid, name, status)
        cpu = self._cpu_seconds(client, [c["Id"] for c, _, _ in alive])
        now = time.monotonic()
        result = []
        with self._lock:
            for container, uuid, state in alive:
                seconds = cpu.get(container["Id"])
                if seconds is not None:
                    self._last_cpu[uuid] = (seconds, now)
                elif uuid in self._last_cpu:
                    seconds = self._last_cpu[uuid][0]
                labels = container.get("Labels") or {}
                result.append(DomainInfo(
                    name=_name(container), uuid=uuid, state=state, cpu_seconds=seconds or 0.0,
                    vcpus=_label_int(labels, LABEL_PROCESSORS, 1),
                    memory_kib=_label_int(labels, LABEL_MEMORY, 0) * 1024,
                ))
            for uuid in [u for u, (_, seen) in self._last_cpu.items() if now - seen > _CPU_MEMORY_SECONDS]:
                del self._last_cpu[uuid]
        return result

    def _cpu_seconds(self, client: docker.APIClient, ids: List[str]) -> Dict[str, float]:
        """CPU seconds by container id from the cgroup statistics; a container that ended
        meanwhile has none."""
        if not ids:
            return {}
        if self.multi_stats and self._is_podman(client):
            found = self._podman_stats(client, ids)
            if found is not None:
                return found
        result = {}
        for container_id in ids:
            try:
                stats = client.stats(container_id, stream=False, one_shot=True)
                result[container_id] = stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9
            except (KeyError, TypeError) as exc:
                log.debug("container %s: no CPU in its stats: %s", container_id[:12], exc)
            except _API_ERRORS as exc:  # exited since it was listed
                log.debug("container %s: no stats: %s", container_id[:12], exc)
        return result

    def _podman_stats(self, client: docker.APIClient, ids: List[str]) -> Optional[Dict[str, float]]:
        """One call for every container (Podman's API); None if it failed (e.g. one of them
        was removed meanwhile: Podman then answers no stats at all)."""
        url = f"{client.base_url}/v4.0.0/libpod/containers/stats"
        try:
            response = client._get(url, params={"stream": "false", "containers": ids})
            response.raise_for_status()
            stats = response.json().get("Stats") or []
            return {s["ContainerID"]: s["CPUNano"] / 1e9 for s in stats if isinstance(s, dict)}
        except (KeyError, TypeError, AttributeError) + _API_ERRORS as exc:
            log.debug("podman stats failed, reading them one by one: %s", exc)
            return None

    # -- stopping ---------------------------------------------------------------------------

    def _gone(self, client: docker.APIClient, container: Dict[str, Any], uuid: str, name: str, status: str) -> None:
        """An exited container: reported (a stopped event with its exit time) at the first
        listing that finds it, removed at the next one. By then the engine has recorded its
        end: removing it at once, a crash in between would lose the exit time."""
        container_id = container["Id"]
        with self._lock:
            reported = container_id in self._exits_reported
            self._exits_reported.add(container_id)
        if reported:
            log.info("%s: container %s %s: removing it", name, uuid, status)
            self._remove(client, container_id, name)
            return
        exited_at = self._exit_time(client, container_id) if status not in _NOT_STARTED else None
        log.info("%s: container %s %s%s", name, uuid, status,
                 "" if exited_at is None else time.strftime(" at %H:%M:%S", time.localtime(exited_at)))
        if exited_at is not None:
            self._deliver(DomainEvent(uuid=uuid, name=name, kind="stopped", time=time.time(),
                                      cpu_seconds=self._forget_cpu(uuid), at=exited_at))

    def _exit_time(self, client: docker.APIClient, container_id: str) -> Optional[float]:
        """When the runtime says the container exited (epoch seconds), or None."""
        try:
            state = client.inspect_container(container_id).get("State") or {}
        except _API_ERRORS:
            return None
        return parse_api_time(state.get("FinishedAt"))

    def _forget_cpu(self, uuid: str) -> Optional[float]:
        with self._lock:
            last = self._last_cpu.pop(uuid, None)
        return None if last is None else last[0]

    def _deliver(self, event: DomainEvent) -> None:
        with self._lock:
            callback = self._callback
        if callback is not None:
            callback(event)

    def destroy(self, uuid: str) -> bool:
        """Stop our container with this UUID: SIGTERM, SIGKILL after its grace period, then
        remove it, in a thread of its own. Returns at once: True if it was alive (or is
        being stopped already), False if there was none. Idempotent."""
        uuid = check_uuid(uuid)
        with self._lock:
            if uuid in self._stopping:
                return True
        client = self._client()
        containers = self._call("lookup for destroy", client.containers, all=True,
                                filters=self._ours(f"{LABEL_UUID}={uuid}"), domain=uuid)
        alive = False
        for container in containers:
            status = str(container.get("State", "")).lower()
            if status not in _ALIVE and status not in _NOT_STARTED:
                self._remove(client, container["Id"], _name(container))  # ended already
                continue
            alive = True
            labels = container.get("Labels") or {}
            grace = max(0, _label_int(labels, LABEL_GRACE, 10))
            self._rename_stopping(client, container, uuid)
            thread = threading.Thread(target=self._stop, name=f"stop {_name(container)}", daemon=True,
                                      args=(container["Id"], _name(container), uuid, grace, status))
            with self._lock:
                if uuid in self._stopping:
                    continue
                self._stopping[uuid] = (container["Id"], thread)
            thread.start()
            log.info("%s: stopping container %s (grace %d s)", _name(container), uuid, grace)
        return alive

    def _rename_stopping(self, client: docker.APIClient, container: Dict[str, Any], uuid: str) -> None:
        """Free the slot's name at once: the next machine in the slot must not wait out the
        grace period (it is still listed by its slot name, from the label)."""
        own = str((container.get("Names") or [""])[0]).lstrip("/")
        if STOPPING_SUFFIX in own:
            return
        try:
            client.rename(container["Id"], f"{own}{STOPPING_SUFFIX}{uuid[:8]}")
        except _API_ERRORS as exc:  # it keeps the slot's name: a new machine there waits for it
            log.warning("%s: cannot rename the container being stopped: %s", own, self._error("rename", exc))

    def _stop(self, container_id: str, name: str, uuid: str, grace: int, status: str) -> None:
        client = None
        try:
            client = self._new_client()
            if status == "paused":
                client.kill(container_id)  # Podman will not stop a paused container
            elif status in _ALIVE:
                client.stop(container_id, timeout=grace)
            self._remove(client, container_id, name)
        except NotFound:
            pass
        except (HypervisorError,) + _API_ERRORS as exc:
            # still alive: listed again, so the engine destroys it again
            error = exc if isinstance(exc, HypervisorError) else self._error("stop", exc)
            log.warning("%s: stopping container %s failed: %s", name, uuid, error)
        finally:
            with self._lock:
                self._stopping.pop(uuid, None)
            if client is not None:
                client.close()

    # -- events -----------------------------------------------------------------------------

    def set_event_callback(self, callback: Callable[[DomainEvent], None]) -> None:
        """Deliver our containers' lifecycle events to ``callback`` from a thread that follows
        the runtime's event stream (and follows it again after the runtime restarts)."""
        with self._lock:
            self._callback = callback
            if self._events is None:
                self._events = EventFollower(f"container-events {self.url}", self._open_events, self._on_event)
            events = self._events
        events.start()

    def _open_events(self) -> Any:
        client = self._client()
        return client.events(decode=True, filters={"type": "container", **self._ours()})

    def _on_event(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        kind = _EVENT_KINDS.get(str(event.get("Action") or event.get("status") or ""))
        actor = event.get("Actor")
        attributes = actor.get("Attributes") if isinstance(actor, dict) else None
        if kind is None or not isinstance(attributes, dict) or attributes.get(LABEL_FACTORY) != self.owner:
            return
        try:
            uuid = check_uuid(str(attributes.get(LABEL_UUID, "")))
        except InvalidValue:
            return
        cpu_seconds = self._forget_cpu(uuid) if kind == "stopped" else None
        name = str(attributes.get(LABEL_NAME) or attributes.get("name", ""))  # the slot's, if renamed
        log.debug("%s: event %s", name, kind)
        self._deliver(DomainEvent(uuid=uuid, name=name, kind=kind, time=time.time(), cpu_seconds=cpu_seconds))

    # -- the rest of the protocol -----------------------------------------------------------

    def describe(self) -> str:
        """E.g. "Podman 4.3.1 (Docker Engine API 1.41)"."""
        client = self._client()
        version = self._call("describe", client.version)
        product = "Podman" if self._is_podman(client) else "Docker"
        return f"{product} {version.get('Version', '?')} (Docker Engine API {version.get('ApiVersion', '?')})"

    def ping(self) -> bool:
        try:
            return bool(self._client().ping())
        except (HypervisorError,) + _API_ERRORS as exc:
            log.debug("%s: ping: %s", self.url, exc)
            return False

    def ensure_network(self, spec: NetworkSpec) -> None:
        """Nothing: containers use the runtime's default network."""

    def remove_disks(self, directory: str) -> None:
        """Nothing: a container has no disk images (its binds are the factory's directories)."""

    def close(self) -> None:
        """Stop following events and drop the client; a later call starts both again.
        Containers being stopped go on being stopped. Exited containers already reported
        are removed now (a clean stop: the engine has recorded their ends), not left until
        the next start."""
        with self._lock:
            events = self._events
            client, self._client_ = self._client_, None
            self._podman = None
            reported, self._exits_reported = set(self._exits_reported), set()
        if client is not None:
            for container_id in sorted(reported):
                self._remove(client, container_id, container_id[:12])
        if events is not None:
            events.stop()
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001 - closing a dead session
                log.debug("%s: closing: %s", self.url, exc)


def _name(container: Dict[str, Any]) -> str:
    """The slot name: the label (a container being stopped is renamed), else its own name."""
    labels = container.get("Labels") or {}
    if isinstance(labels, dict) and labels.get(LABEL_NAME):
        return str(labels[LABEL_NAME])
    names = container.get("Names") or [""]
    return str(names[0]).lstrip("/")


_API_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


def parse_api_time(text: Any) -> Optional[float]:
    """Epoch seconds of an API time ("2026-12-07T15:01:59.123456789Z", nanoseconds and an
    offset allowed); None for the zero time, garbage or anything before 2000."""
    match = _API_TIME.fullmatch(str(text or "").strip())
    if match is None:
        return None
    whole, fraction, zone = match.groups()
    try:
        moment = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        return None
    seconds = moment.timestamp() + (float("0." + fraction[:9]) if fraction else 0.0)
    return seconds if seconds > 946684800 else None
