"""The MJF and metadata HTTP server that VMs talk to (Vac's 169.254.169.253/.254 servers).

What a VM can do (Vac paths, plus the OpenStack and token forms):

- ``GET /machinefeatures[/]``, ``/jobfeatures[/]``: Vac's HTML listing; ``GET
  /{machinefeatures,jobfeatures}/KEY``: the value, text/plain. Read from disk per request,
  because a drain rewrites ``shutdowntime`` while the VM runs.
- ``PUT /joboutputs/NAME`` (or ``POST``, for busybox wget): stores the body as
  ``joboutputs/NAME`` atomically, 201. Never readable back (``GET`` is 405, as in Vac).
- Metadata: ``/latest/`` is ``/0000-00-00/``; ``/<ver>/user-data``,
  ``/openstack/<ver>/user_data`` (and Vac's ``user-data``); EC2 ``/<ver>/meta-data/...``;
  ``/openstack/<ver>/meta_data.json`` (and Vac's ``meta-data.json`` forms).

Everything a VM sends is hostile. The parts, each with one job:

- :mod:`.wire` (parse): request heads in, responses out, as bytes; bounded heads, no
  chunked bodies;
- :mod:`.routes` (policy): which VM is asking (address or token) and what it may read;
- :mod:`.fairness` (policy): connection shares per VM and round-robin service;
- :mod:`.connection`: one connection's explicit state and its transitions, its deadlines;
- :mod:`.exchange`: what the bytes of a connection mean: requests, answers, bodies;
- :mod:`.upload` (I/O): joboutputs bodies stored atomically within the caps;
- :mod:`.server` (I/O): sockets, the selectors loop, accepting, flushing, closing.
"""

from vacfactory.vmio.http.routes import (METADATA_ADDRESS, MJF_ADDRESS, REDACTED, base_url, meta_data_document,
                                         shown)
from vacfactory.vmio.http.connection import Timeouts
from vacfactory.vmio.http.server import MetadataServer
from vacfactory.vmio.http.wire import HTTPError, Request, parse_head

__all__ = ["METADATA_ADDRESS", "MJF_ADDRESS", "REDACTED", "base_url", "meta_data_document", "shown",
           "MetadataServer", "Timeouts", "HTTPError", "Request", "parse_head"]
