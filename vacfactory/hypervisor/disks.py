"""VM disk images: qcow2 overlays on a cached base image, sparse scratch disks, format probes.

Everything goes through ``qemu-img`` with argument lists; every path is checked first
(absolute, no control characters: an absolute path can never be read as an option, and
qemu only treats ``proto:`` as a protocol prefix when no ``/`` comes before the colon).

Permissions, as measured with libvirt 9.0 (``dynamic_ownership = 1``, the default) and qemu
running as ``libvirt-qemu``:

- libvirt chowns the overlay to libvirt-qemu while the domain runs and gives it back to root
  afterwards, so the files we create can be root-owned 0600 (job data stays private).
- libvirt also chowns the *backing* (base) image to libvirt-qemu, and leaves it that way: it
  does not restore images that other domains may share. A 0600 root-owned base works.
- What libvirt cannot fix is directory search permission: every directory on the path of an
  overlay or of its base must be searchable (``x``) by libvirt-qemu, else ``createXML`` fails
  with "Cannot access storage file ... (as uid:64055, gid:64055): Permission denied" (a 0700
  VM directory) or "Cannot access backing file" (a 0700 base image directory). 0711 is
  enough. The same holds for the kernel and initrd; the console log is written by virtlogd
  as root, so its directory may be 0700.

A downloaded base image is untrusted: :func:`image_format` refuses images that name a
backing file or an external data file, which a raw image crafted to look like qcow2 could
otherwise use to make a VM read any host file, and (given ``max_virtual_bytes``) images whose
virtual size is larger: a 16 MB qcow2 may claim a petabyte, the overlay inherits that size, and
the guest could grow the overlay on the host that far.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from typing import List, Optional

from ..errors import HypervisorError
from .base import check_path

log = logging.getLogger(__name__)

__all__ = ["create_overlay", "create_scratch", "image_format", "remove_disk", "FORMATS"]

#: formats a VM disk or a base image may have
FORMATS = ("qcow2", "raw")

#: mode of the images we create; libvirt chowns them for qemu (see the module docstring)
_MODE = 0o600

#: qemu-img is quick on well-formed images; a hostile one must not hang the factory
_TIMEOUT = 120


def _qemu_img() -> str:
    found = shutil.which("qemu-img", path=os.pathsep.join([os.defpath, "/usr/local/bin"]))
    if found is None:
        raise HypervisorError("qemu-img is not installed (Debian: qemu-utils)")
    return found


def _run(args: List[str], path: str) -> str:
    """Run ``qemu-img ARGS``; HypervisorError naming ``path`` and qemu-img's stderr."""
    try:
        result = subprocess.run(
            [_qemu_img()] + args, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise HypervisorError(f"{path}: qemu-img {args[0]} took more than {_TIMEOUT} s") from exc
    except OSError as exc:
        raise HypervisorError(f"{path}: cannot run qemu-img: {exc}") from exc
    if result.returncode != 0:
        raise HypervisorError(
            f"{path}: qemu-img {args[0]} failed (exit {result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"image format must be one of {FORMATS}, not {fmt!r}")


def create_overlay(base_image: str, path: str, backing_format: str) -> None:
    """Create ``path``, a qcow2 overlay whose reads fall through to ``base_image``.

    The backing format is always written into the overlay (``-F``): libvirt refuses to probe
    it, and probing is what lets a crafted image pick its own format.
    """
    check_path("base image", base_image)
    check_path("overlay", path)
    _check_format(backing_format)
    _run(["create", "-q", "-f", "qcow2", "-F", backing_format, "-b", base_image, path], path)
    os.chmod(path, _MODE)
    log.info("%s: overlay on %s (%s)", path, base_image, backing_format)


def create_scratch(path: str, size_bytes: int) -> None:
    """Create ``path``, an empty sparse qcow2 disk of ``size_bytes`` (guest-visible size)."""
    check_path("scratch disk", path)
    if not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes < 512:
        raise ValueError(f"{path}: scratch size must be an integer >= 512, got {size_bytes!r}")
    _run(["create", "-q", "-f", "qcow2", path, str(size_bytes)], path)
    os.chmod(path, _MODE)
    log.info("%s: scratch disk of %d bytes", path, size_bytes)


def image_format(path: str, max_virtual_bytes: Optional[int] = None) -> str:
    """The format qemu-img finds in ``path`` (the extension means nothing).

    Raises HypervisorError for formats we do not run, for images that refer to other
    files (a backing file or an external data file): a base image must stand alone, and for
    images whose virtual size exceeds ``max_virtual_bytes`` (if given).
    """
    check_path("image", path)
    # -U: base images are probed while running VMs hold them open read-only
    out = _run(["info", "-U", "--output=json", path], path)
    try:
        info = json.loads(out)
        fmt = str(info["format"])
        data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
        virtual_size = int(info["virtual-size"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HypervisorError(f"{path}: unreadable qemu-img info output: {exc}") from exc
    if "backing-filename" in info or "full-backing-filename" in info:
        raise HypervisorError(f"{path}: image has a backing file; refusing to use it as a base")
    if data_file:
        raise HypervisorError(f"{path}: image has an external data file; refusing to use it")
    if fmt not in FORMATS:
        raise HypervisorError(f"{path}: image format {fmt!r} is not one of {FORMATS}")
    if max_virtual_bytes is not None and virtual_size > max_virtual_bytes:
        raise HypervisorError(f"{path}: {fmt} image claims a virtual size of {virtual_size} bytes "
                              f"({virtual_size / (1 << 30):.1f} GiB), more than the {max_virtual_bytes} bytes "
                              f"({max_virtual_bytes / (1 << 30):g} GiB) allowed (max_root_image_gb)")
    return fmt


def remove_disk(path: str) -> None:
    """Delete a VM's disk image; nothing to do if it is already gone."""
    check_path("disk", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise HypervisorError(f"{path}: cannot remove disk: {exc.strerror}") from exc
    log.info("%s: removed", path)
