"""OpenStack config drive: user_data and meta_data.json on an ISO9660 image for the VM.

Images that cannot reach the metadata server (no network at boot, or a cloud-init configured
for ConfigDrive only) read the same contextualization from a CD-ROM labelled ``config-2``
with the OpenStack layout::

    openstack/latest/user_data          openstack/2012-08-10/user_data
    openstack/latest/meta_data.json     openstack/2012-08-10/meta_data.json

The image carries Rock Ridge (POSIX names, what Linux mounts show) and Joliet (Windows names)
on top of plain ISO9660 (upper-case 8.3-ish names), like ``genisoimage -J -r -V config-2``.
It is built in memory (it is small) and written atomically.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Mapping, Tuple

import pycdlib

from vacfactory.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

VOLUME_LABEL = "config-2"
#: the dated version directory written besides ``latest`` (the oldest OpenStack version,
#: which every cloud-init knows)
DATED_VERSION = "2012-08-10"
VERSIONS: Tuple[str, ...] = ("latest", DATED_VERSION)


def _iso_dir(name: str) -> str:
    return name.upper().replace("-", "_")


def build_config_drive_bytes(user_data: bytes, meta_data: Mapping) -> bytes:
    """The ISO image, as bytes (see :func:`build_config_drive`)."""
    meta_json = (json.dumps(dict(meta_data), sort_keys=True, indent=1) + "\n").encode("utf-8")
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=VOLUME_LABEL, joliet=3, rock_ridge="1.09")
    try:
        iso.add_directory("/OPENSTACK", rr_name="openstack", joliet_path="/openstack")
        for version in VERSIONS:
            iso_dir = "/OPENSTACK/" + _iso_dir(version)
            posix_dir = "/openstack/" + version
            iso.add_directory(iso_dir, rr_name=version, joliet_path=posix_dir)
            for posix_name, iso_name, payload in (
                ("user_data", "USER_DATA.;1", user_data),
                ("meta_data.json", "META_DATA.JSON;1", meta_json),
            ):
                iso.add_fp(io.BytesIO(payload), len(payload), f"{iso_dir}/{iso_name}",
                           rr_name=posix_name, joliet_path=f"{posix_dir}/{posix_name}")
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def build_config_drive(path: str, user_data: bytes, meta_data: Mapping) -> None:
    """Write a ``config-2`` ISO with ``user_data`` and ``meta_data`` (as JSON) to ``path``.

    The file appears complete or not at all (temp file + rename), so a domain never boots
    from half an image.
    """
    image = build_config_drive_bytes(user_data, meta_data)
    atomic_write_bytes(path, image, mode=0o644)
    log.info("%s: config drive written (%d bytes)", path, len(image))
