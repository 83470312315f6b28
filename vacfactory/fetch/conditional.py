"""The conditional GET: revalidate a cached download with the validators it came with.

Both caches (:mod:`.imagecache`, :mod:`.pipefetch`) store a download's ``ETag`` and
``Last-Modified`` and send them back as ``If-None-Match`` / ``If-Modified-Since``; a 304
means the cached copy is still current. Vac required Last-Modified and sent only the file's
mtime. A 304 counts only when a copy is held: without one it is a server error like any
other status but 200.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

from vacfactory.fetch.safefetch import FetchError, Response, open_url
from vacfactory.fetch.urlpolicy import UrlPolicy


@dataclass(frozen=True)
class Validators:
    """What the server said identifies the version we hold (either may be missing)."""

    etag: Optional[str] = None
    last_modified: Optional[str] = None

    @classmethod
    def of(cls, response: Response) -> "Validators":
        return cls(response.header("ETag"), response.header("Last-Modified"))

    def headers(self) -> Dict[str, str]:
        """The request headers that ask "only if changed since this version"."""
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


@contextlib.contextmanager
def conditional_get(url: str, held: Optional[Validators], policy: UrlPolicy, timeout: float,
                    ca_path: Optional[str] = None, checked: bool = True) -> Iterator[Optional[Response]]:
    """GET ``url`` (through :func:`~.safefetch.open_url`) and yield the 200 response to read,
    or None when the server answers 304 to the validators ``held`` of the cached copy.

    Any other status is a FetchError ("HTTP 404 Not Found"); the connection is closed when
    the block ends."""
    headers = held.headers() if held is not None else {}
    with open_url(url, policy, timeout, ca_path, headers, checked=checked) as response:
        if response.status == 304 and held is not None:
            yield None
            return
        if response.status != 200:
            raise FetchError(f"HTTP {response.status} {response.reason or ''}".strip())
        yield response
