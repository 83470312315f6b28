"""Root images (and user_data templates) by path or http(s) URL: downloaded once, verified,
shared read-only by all VMs.

``ImageCache(directory, ca_path, timeout).get(location, sha256)`` returns the local path of a
verified image. For a local path it only verifies (existence, and the sha256 if given). For
a URL it keeps a cached copy under ``<state_dir>/imagecache/`` and:

- revalidates it with a conditional GET (:mod:`vacfactory.fetch.conditional`: the stored
  ETag and Last-Modified), at most every ``check_seconds``; a 304 reuses the cache;
- fetches through :func:`vacfactory.fetch.safefetch.open_url`: one deadline of ``timeout`` seconds
  over the whole download (headers included), redirects checked by ``policy`` and never
  https -> http; a URL a vacuum pipe gave (``get(..., pipe=...)``) is itself checked by
  ``policy`` (public hosts only, unless the site lists a mirror) and cached apart from the same
  URL in the site's configuration, so a pipe is never handed the site's trusted copy;
- streams a 200 into a temporary file in the same directory (hashing as it goes), refuses it
  if the body is shorter or longer than Content-Length, if its sha256 differs from the one
  configured, if it is larger than ``max_bytes`` (the cache's, or the caller's smaller one:
  engine.vmbuild passes one for user_data templates), or if writing the next piece would leave
  less than ``reserve_bytes`` free on the filesystem (checked before every write, whatever
  Content-Length said; the partial file is deleted), then fsyncs it and renames it to a NEW
  versioned name ``<key>-<n>.img``. VMs use images through qcow2
  overlays whose backing file is that path, so an image in use is never replaced or
  truncated under a running VM; :meth:`ImageCache.prune` deletes old versions once no live
  VM uses them;
- when the server cannot be reached, answers with an error, or sends a bad body, keeps
  using the cached copy (with a warning; Vac raised even with a good copy at hand), and
  raises :class:`~vacfactory.errors.ImageError` only when there is no usable copy.

With ``background=True`` (the daemon) :meth:`ImageCache.get` never touches the network, because
the engine calls it and a download may take up to image_fetch_timeout_seconds (a day at most)
while the engine must keep enforcing limits and pinging the systemd watchdog. It returns the
current cached copy at once and, when the check is due, revalidates in a background thread (the
VM being created uses the copy at hand; later ones get the new version). Without a usable copy
it starts the download in a background thread and raises :class:`ImageNotReady`: the engine
skips that machinetype this round, and ``on_ready`` (the engine's wake-up) is called once the
image is in place. After a failed attempt the next one waits ``retry_seconds``. A body over
``max_bytes`` or a URL the policy refuses, with no usable copy, is an
:class:`~vacfactory.errors.ImageError` instead: waiting does not fix it, so the creation fails
and says why.

The sidecar ``<key>.json`` (written atomically) records the URL, the current version's file
name, size and sha256, the validators and when the server was last asked. Images are made
read-only (0444): qemu opens them read-only through the overlays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from vacfactory.atomic import (TEMP_PREFIX, atomic_write_json, fsync_directory, remove_stale_temporaries,
                               removed_on_failure)
from vacfactory.errors import ImageError, VacFactoryError, shorten
from vacfactory.fetch.conditional import Validators, conditional_get
from vacfactory.fetch.safefetch import FetchError, FetchRefused, Response
from vacfactory.fetch.urlpolicy import UrlPolicy

log = logging.getLogger(__name__)

IMAGE_MODE = 0o444
_CHUNK = 1 << 20
_VERSION = re.compile(r"\A([0-9a-f]{24})-([0-9]+)\.img\Z")
_SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")
#: after a failed background download or revalidation, wait this long before the next one
RETRY_SECONDS = 60.0
#: default largest download (image_max_download_gb)
MAX_DOWNLOAD_BYTES = 20 << 30
#: default free space a download leaves on the cache's filesystem (image_download_reserve_mb)
RESERVE_BYTES = 256 << 20


class ImageNotReady(VacFactoryError):
    """No verified copy of an image yet; it is being fetched in the background.

    Not an ImageError: the machinetype is not startable this round, which is not a failed
    creation (no factory-error, no failure counted) and resolves itself.
    """


def is_url(location: str) -> bool:
    return location.lower().startswith(("http://", "https://"))


def url_key(url: str, checked: bool = False) -> str:
    """The file name stem of a URL's cache entries (a hash: URLs are not file names).

    A URL fetched under the policy (from a vacuum pipe) has entries of its own: a pipe naming
    the same URL as the site's configuration must not be served the copy the site's trusted
    fetch made (that is the SSRF the policy prevents)."""
    return hashlib.sha256((f"checked {url}" if checked else url).encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class _Source:
    """A URL and whether it is checked by the policy (where a pipe gave it) or trusted (None)."""

    url: str
    pipe: Optional[str] = None

    @property
    def checked(self) -> bool:
        return self.pipe is not None

    @property
    def key(self) -> str:
        return url_key(self.url, self.checked)

    def __str__(self) -> str:
        return f"{self.url} (from {self.pipe})" if self.pipe else self.url


@dataclass(frozen=True)
class _Entry:
    """A URL's sidecar: which version is current and how to revalidate it."""

    url: str
    file: str
    size: int
    sha256: str
    etag: Optional[str] = None
    last_modified: Optional[str] = None
    checked: float = 0.0
    #: fetched under the URL policy (a pipe's URL)
    policy: bool = False

    def as_json(self) -> Dict[str, Any]:
        return {"url": self.url, "file": self.file, "size": self.size, "sha256": self.sha256,
                "etag": self.etag, "last_modified": self.last_modified, "checked": self.checked,
                "policy": self.policy}


@dataclass(frozen=True)
class _Download:
    path: str
    size: int
    sha256: str
    validators: Validators


class _Failure(Exception):
    """A refresh failed; the cached copy may still serve."""


class _Permanent(_Failure):
    """Waiting will not fix it: a body over ``max_bytes``, a URL the policy refuses."""


@dataclass(frozen=True)
class _Result:
    """What one (blocking) refresh gave: the path to use, and what went wrong if anything."""

    path: Optional[str]
    failure: Optional[str] = None
    changed: bool = False
    #: the failure is permanent (a body over ``max_bytes``, a refused URL): an error, not a wait
    permanent: bool = False


class ImageCache:
    """The image cache in ``directory`` (thread-safe; one download per URL at a time).

    ``_lock`` guards only quick work on the cache directory (sidecars, installing a version,
    pruning); downloads run outside it, so an engine thread asking for a cached copy never
    waits for the network.
    """

    def __init__(self, directory: str, ca_path: Optional[str] = None, timeout: float = 120.0,
                 check_seconds: float = 0.0, clock: Callable[[], float] = time.time,
                 background: bool = False, retry_seconds: float = RETRY_SECONDS,
                 on_ready: Optional[Callable[[], None]] = None, policy: Optional[UrlPolicy] = None,
                 max_bytes: int = MAX_DOWNLOAD_BYTES, reserve_bytes: int = RESERVE_BYTES) -> None:
        self.directory = directory
        self.ca_path = ca_path
        self.timeout = timeout
        self.check_seconds = check_seconds
        self.clock = clock
        #: which hosts pipe URLs and redirects may reach (the daemon updates it on reload)
        self.policy = policy or UrlPolicy()
        #: largest download; ``get``'s own max_bytes may only lower it
        self.max_bytes = max_bytes
        #: free bytes a download always leaves on the cache's filesystem
        self.reserve_bytes = reserve_bytes
        self.background = background
        self.retry_seconds = retry_seconds
        #: called (from a download thread) when a background fetch put a new version in place
        self.on_ready = on_ready
        self._lock = threading.Lock()
        self._url_locks: Dict[str, threading.Lock] = {}
        #: source -> the thread fetching it in the background
        self._fetching: Dict[_Source, threading.Thread] = {}
        #: source -> (time.monotonic() of the failed attempt, why, permanent) for retries
        self._failures: Dict[_Source, Tuple[float, str, bool]] = {}
        #: downloads writing temporary files right now (prune leaves temporaries alone then)
        self._active = 0
        #: (path, size, mtime_ns, inode) -> sha256 of local images already hashed
        self._digests: Dict[Tuple[str, int, int, int], str] = {}

    # -- public -------------------------------------------------------------------------

    def get(self, location: str, sha256: Optional[str] = None, max_bytes: Optional[int] = None,
            pipe: Optional[str] = None) -> str:
        """Local path of a verified copy of ``location`` (a path or an http(s) URL).

        In background mode a URL is never fetched here: see the module docstring.
        ``max_bytes`` (small files such as user_data templates) refuses a larger download;
        with no usable copy that is an :class:`ImageError`, not :class:`ImageNotReady`,
        because waiting does not fix a wrong file. ``pipe`` names the vacuum pipe entry that
        gave a URL: it is then fetched under :attr:`policy` (see :mod:`vacfactory.fetch.urlpolicy`),
        and a refusal is an ImageError naming that entry.
        """
        if sha256 is not None:
            sha256 = sha256.lower()
            if not _SHA256.match(sha256):
                raise ImageError(f"{location}: {sha256!r} is not a sha256 digest")
        if not is_url(location):
            with self._lock:
                return self._local(location, sha256)
        source = _Source(location, pipe)
        limit = self.max_bytes if max_bytes is None else min(max_bytes, self.max_bytes)
        if self.background:
            return self._cached_or_fetch_later(source, sha256, limit)
        with self._url_lock(source):
            result = self._remote(source, sha256, limit)
        if result.path is None:
            raise ImageError(f"{source}: {result.failure} (and no usable cached copy)")
        return result.path

    def prune(self, in_use: Set[str]) -> List[str]:
        """Delete every cached file that is neither a URL's current version nor in ``in_use``
        (the backing images of live VMs); return the deleted paths."""
        keep = {os.path.realpath(p) for p in in_use}
        removed: List[str] = []
        with self._lock:
            current = set()
            try:
                names = os.listdir(self.directory)
            except FileNotFoundError:
                return removed
            for name in names:
                if name.endswith(".json") and not name.startswith(TEMP_PREFIX):
                    entry = self._read_entry_file(os.path.join(self.directory, name))
                    if entry is not None:
                        current.add(entry.file)
            for name in names:
                path = os.path.join(self.directory, name)
                if _VERSION.match(name) and name not in current and os.path.realpath(path) not in keep:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                    removed.append(path)
                    log.info("%s: old image version removed", path)
            if self._active == 0:  # else a download is writing its temporary file right now
                remove_stale_temporaries(self.directory)
        return removed

    def current(self, url: str, pipe: Optional[str] = None) -> Optional[str]:
        """The path of the current cached version of ``url``, if any (no network)."""
        entry = self._read_entry(_Source(url, pipe))
        return self._path(entry.file) if entry is not None and self._valid(entry) else None

    def fetching(self) -> List[str]:
        """The URLs being fetched in the background right now."""
        with self._lock:
            return sorted(source.url for source in self._fetching)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no background fetch runs (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._fetching.values())
            if not threads:
                return True
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                with self._lock:
                    return not self._fetching

    # -- background mode ----------------------------------------------------------------

    def _cached_or_fetch_later(self, source: _Source, sha256: Optional[str], max_bytes: int) -> str:
        """The usable cached copy (revalidated in the background when due), else ImageNotReady."""
        now = self.clock()
        with self._lock:
            usable = self._usable_entry(source, sha256)
            if usable is not None and now - usable.checked < self.check_seconds:
                return self._path(usable.file)
            started = self._fetch_later(source, sha256, max_bytes)
            failure = self._failures.get(source)
            running = source in self._fetching
        if usable is not None:
            if started:
                log.debug("%s: revalidating in the background; using %s meanwhile", source, self._path(usable.file))
            return self._path(usable.file)
        if running:
            raise ImageNotReady(f"{source}: no usable cached copy yet; downloading it in the background")
        if failure is not None and failure[2]:
            raise ImageError(f"{source}: {failure[1]} (and no usable cached copy)")
        why = failure[1] if failure is not None else "not fetched yet"
        raise ImageNotReady(f"{source}: no usable cached copy ({why}); the download is retried in the background")

    def _fetch_later(self, source: _Source, sha256: Optional[str], max_bytes: int) -> bool:
        """Start a background fetch of ``source`` unless one runs or the last failed recently.
        Called with ``_lock`` held."""
        if source in self._fetching:
            return False
        failed = self._failures.get(source)
        if failed is not None and time.monotonic() - failed[0] < self.retry_seconds:
            return False
        thread = threading.Thread(target=self._fetch_in_background, args=(source, sha256, max_bytes),
                                  name=f"vacfactory-image-{source.key[:8]}", daemon=True)
        self._fetching[source] = thread
        thread.start()
        return True

    def _fetch_in_background(self, source: _Source, sha256: Optional[str], max_bytes: int) -> None:
        result = _Result(None, "the download did not finish")
        try:
            with self._url_lock(source):
                result = self._remote(source, sha256, max_bytes)
        except (VacFactoryError, OSError) as error:  # e.g. the sidecar cannot be written
            result = _Result(None, str(error))
        finally:
            with self._lock:
                del self._fetching[source]
                if result.failure is None:
                    self._failures.pop(source, None)
                else:
                    self._failures[source] = (time.monotonic(), result.failure, result.permanent)
        if result.path is None:
            log.error("%s: %s; no usable cached copy: its machinetypes %s, retried in %g s", source, result.failure,
                      "cannot start" if result.permanent else "wait", self.retry_seconds)
        if result.changed and self.on_ready is not None:
            self.on_ready()

    # -- local paths --------------------------------------------------------------------

    def _local(self, path: str, sha256: Optional[str]) -> str:
        try:
            st = os.stat(path)
        except OSError as error:
            raise ImageError(f"{path}: {error.strerror or error}") from None
        if not os.path.isfile(path):
            raise ImageError(f"{path}: not a regular file")
        if sha256 is not None:
            key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
            digest = self._digests.get(key)
            if digest is None:
                digest = _hash_file(path)
                self._digests[key] = digest
            if digest != sha256:
                raise ImageError(f"{path}: sha256 is {digest}, not the configured {sha256}")
        return path

    # -- URLs ---------------------------------------------------------------------------

    def _url_lock(self, source: _Source) -> threading.Lock:
        with self._lock:
            return self._url_locks.setdefault(source.key, threading.Lock())

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _entry_path(self, source: _Source) -> str:
        return self._path(source.key + ".json")

    def _read_entry(self, source: _Source) -> Optional[_Entry]:
        entry = self._read_entry_file(self._entry_path(source))
        ok = entry is not None and entry.url == source.url and entry.policy == source.checked
        return entry if ok else None

    @staticmethod
    def _read_entry_file(path: str) -> Optional[_Entry]:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            entry = _Entry(url=str(raw["url"]), file=str(raw["file"]), size=int(raw["size"]),
                           sha256=str(raw["sha256"]), etag=raw.get("etag"), last_modified=raw.get("last_modified"),
                           checked=float(raw.get("checked") or 0.0), policy=raw.get("policy") is True)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return entry if _VERSION.match(entry.file) else None

    def _usable_entry(self, source: _Source, sha256: Optional[str]) -> Optional[_Entry]:
        return self._usable(self._read_entry(source), sha256)

    def _usable(self, entry: Optional[_Entry], sha256: Optional[str]) -> Optional[_Entry]:
        """``entry`` if its file is in place and it is the content asked for (any, or ``sha256``)."""
        return entry if entry is not None and self._valid(entry) and sha256 in (None, entry.sha256) else None

    def _valid(self, entry: _Entry) -> bool:
        """The cached file is there and has the recorded size (cheap; not re-hashed)."""
        try:
            return os.path.getsize(self._path(entry.file)) == entry.size
        except OSError:
            return False

    def _remote(self, source: _Source, sha256: Optional[str], max_bytes: int) -> _Result:
        """Refresh ``source`` if due (blocking; the caller holds its lock)."""
        now = self.clock()
        with self._lock:
            entry = self._read_entry(source)
            usable = self._usable(entry, sha256)
        if usable is not None and now - usable.checked < self.check_seconds:
            return _Result(self._path(usable.file))  # a concurrent caller has just refreshed it
        with self._lock:
            self._active += 1
        try:
            try:
                download = self._download(source, usable, sha256, max_bytes)
            except _Failure as failure:
                permanent = isinstance(failure, _Permanent)
                if usable is not None:
                    log.warning("%s: cannot refresh the image (%s): using the cached copy %s", source, failure,
                                self._path(usable.file))
                    return _Result(self._path(usable.file), str(failure), permanent=permanent)
                return _Result(None, str(failure), permanent=permanent)
            if download is None:  # 304 Not Modified
                assert usable is not None
                with self._lock:
                    self._write_entry(source, _replace(usable, checked=now))
                return _Result(self._path(usable.file))
            path = self._install(source, download, entry, now)
        finally:
            with self._lock:
                self._active -= 1
        return _Result(path, changed=usable is None or path != self._path(usable.file))

    def _install(self, source: _Source, download: _Download, previous: Optional[_Entry], now: float) -> str:
        """Put a verified download in place under a new version name (or reuse an identical one).

        Under ``_lock``: prune must never see the new file before the sidecar names it."""
        with self._lock:
            if previous is not None and self._valid(previous) and previous.sha256 == download.sha256:
                os.unlink(download.path)
                name = previous.file
                log.info("%s: unchanged content, keeping %s", source, self._path(name))
            else:
                name = f"{source.key}-{self._next_version(source.key)}.img"
                os.chmod(download.path, IMAGE_MODE)
                os.rename(download.path, self._path(name))  # a new name: never over a file in use
                fsync_directory(self.directory)
                log.info("%s: cached as %s (%d bytes, sha256 %s)", source, self._path(name), download.size,
                         download.sha256)
            self._write_entry(source, _Entry(url=source.url, file=name, size=download.size, sha256=download.sha256,
                                             etag=download.validators.etag,
                                             last_modified=download.validators.last_modified, checked=now,
                                             policy=source.checked))
        return self._path(name)

    def _next_version(self, key: str) -> int:
        highest = 0
        for name in os.listdir(self.directory):
            match = _VERSION.match(name)
            if match and match.group(1) == key:
                highest = max(highest, int(match.group(2)))
        return highest + 1

    def _write_entry(self, source: _Source, entry: _Entry) -> None:
        atomic_write_json(self._entry_path(source), entry.as_json())

    def _download(self, source: _Source, cached: Optional[_Entry], sha256: Optional[str],
                  max_bytes: int) -> Optional[_Download]:
        """GET the source (conditionally if ``cached``) into a temp file; None on 304."""
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        held = Validators(cached.etag, cached.last_modified) if cached is not None else None
        try:
            with conditional_get(source.url, held, self.policy, self.timeout, self.ca_path,
                                 checked=source.checked) as response:
                if response is None:
                    return None
                return self._receive(source, response, sha256, max_bytes)
        except FetchRefused as error:
            raise _Permanent(f"refused: {error}") from None
        except FetchError as error:
            raise _Failure(shorten(str(error), 200)) from None
        except OSError as error:  # disk full, unwritable cache: the cached copy may still serve
            raise _Failure(f"cannot write into {self.directory}: {error.strerror or error}") from None

    def _receive(self, source: _Source, response: Response, sha256: Optional[str], max_bytes: int) -> _Download:
        expected = _content_length(response)
        if expected is not None and expected > max_bytes:
            raise _Permanent(_too_large(max_bytes, f"Content-Length is {expected}"))
        if expected is not None:
            room = shutil.disk_usage(self.directory).free - self.reserve_bytes
            if expected > room:
                raise _Failure(f"an image of {expected} bytes does not fit: "
                               + self._no_room("before downloading"))
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{source.key}-", dir=self.directory)
        with removed_on_failure(tmp):
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in response.iter_body(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise _Permanent(_too_large(max_bytes, f"received {size} bytes so far"))
                    # free space checked before every write: a server with no (or a false)
                    # Content-Length must not fill the filesystem the VMs' files live on
                    fs = os.fstatvfs(f.fileno())
                    if fs.f_bavail * fs.f_frsize - len(chunk) < self.reserve_bytes:
                        raise _Failure(self._no_room(f"after {size - len(chunk)} bytes"))
                    f.write(chunk)
                    digest.update(chunk)
                f.flush()
                os.fsync(f.fileno())
            if expected is not None and size != expected:
                raise _Failure(f"received {size} bytes but Content-Length is {expected}")
            got = digest.hexdigest()
            if sha256 is not None and got != sha256:
                raise _Failure(f"sha256 of the download is {got}, not the configured {sha256}")
        return _Download(tmp, size, got, Validators.of(response))

    def _no_room(self, what: str) -> str:
        return (f"stopped {what}: {self.directory} would have less than the {self.reserve_bytes >> 20} MiB "
                "kept free (image_download_reserve_mb)")


def _content_length(response: Response) -> Optional[int]:
    """The body length the server announced (unknown when it compressed the body anyway)."""
    if (response.header("Content-Encoding") or "identity").lower() != "identity":
        return None
    text = response.header("Content-Length")
    if text is None or not text.strip().isdigit():
        return None
    return int(text.strip())


def _too_large(max_bytes: int, detail: str) -> str:
    return f"larger than the {max_bytes}-byte limit for this file ({detail})"


def _replace(entry: _Entry, **changes: Any) -> _Entry:
    values = entry.as_json()
    values.update(changes)
    return _Entry(**values)


def _hash_file(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
    except OSError as error:
        raise ImageError(f"{path}: cannot read: {error.strerror or error}") from None
    return digest.hexdigest()
