"""Files the daemon and the engine will open: state_dir, each machinetype's images, kernel,
user_data and proxy files, root_public_key and space_key_file, the NFS server's program and the
APEL sender's certificate, key and CAs."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any, Callable, List, Optional

from vacfactory.config.model import Config
from vacfactory.config import options as table
from vacfactory.config.parsers import is_url
from vacfactory.errors import VacFactoryError

from .findings import ERROR, NOTE, WARNING, Finding, Locator

#: the engine reads at most this much of a local user_data template (vmbuild's limit)
MAX_TEMPLATE_BYTES = 4 * 1024 * 1024
#: OpenSSH public key types, as the first field of a key line
_KEY_LINE = re.compile(r"(ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp(256|384|521)"
                       r"|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)\s+\S+")


def state_dir(path: str, locator: Locator) -> List[Finding]:
    """The state directory exists and is writable, or can be created."""
    def found(severity: str, message: str) -> List[Finding]:
        return [locator.finding(severity, message, table.SETTINGS, table.STATE_DIR)]

    if os.path.lexists(path) and not os.path.isdir(path):
        return found(ERROR, f"{path} exists and is not a directory: the daemon cannot start")
    if os.path.isdir(path):
        try:
            fd, probe = tempfile.mkstemp(prefix=".vacfactory-check-", dir=path)
        except OSError as error:
            return found(ERROR, f"{path} is not writable ({error.strerror}) by uid {os.geteuid()}: "
                                "the daemon cannot keep its state there")
        os.close(fd)
        os.unlink(probe)
        return []
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return found(ERROR, f"{path} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        return found(ERROR, f"{path} cannot be created: {parent} is not writable by uid {os.geteuid()}")
    return found(NOTE, f"{path} does not exist yet; the daemon creates it")


#: probe of a root image's format (hypervisor.disks.image_format: qemu-img info)
ImageProbe = Callable[[str], str]


def machinetype_files(config: Config, locator: Locator, image_format: ImageProbe) -> List[Finding]:
    """root_image, kernel_image, initrd_image, user_data and user_data_file_* of every
    machinetype exist and are readable; a vm-raw root image is a qcow2 or raw image.

    A machinetype that is never started (share 0, or a container model) gets warnings, not
    errors: nothing fails until its share is raised.
    """
    findings: List[Finding] = []
    for name, mt in config.machinetypes.items():
        if not mt.startable:
            continue
        title = f"{table.MACHINETYPE} {name}"
        severity = ERROR if mt.target_share > 0 else WARNING
        later = "" if severity == ERROR else " (not started while target_share is 0)"

        def add(option: str, message: str) -> None:
            findings.append(locator.finding(severity, message + later, title, option))

        if not mt.root_image and not mt.kernel_image:
            add("root_image", "neither root_image nor kernel_image is set: no VM can be created")
        if mt.root_image and not is_url(mt.root_image):
            why = _unreadable(mt.root_image)
            if why is None and mt.machine_model == "vm-raw":
                why = _image_problem(mt.root_image, image_format)
            if why:
                add("root_image", why)
        for option in ("kernel_image", "initrd_image"):
            path = getattr(mt, option)
            why = _unreadable(path) if path else None
            if why:
                add(option, why)
        if mt.user_data and not is_url(mt.user_data):
            why = _unreadable(mt.user_data, MAX_TEMPLATE_BYTES)
            if why:
                add("user_data", why)
        for suffix, path in mt.user_data_files.items():
            why = _unreadable(path) if path and not is_url(path) else None
            if why:
                add(f"user_data_file_{suffix}", why)
        if mt.user_data_proxy:
            for file_name in ("x509cert.pem", "x509key.pem"):
                why = _unreadable(os.path.join(mt.machinetype_path, file_name))
                if why:
                    add("user_data_proxy", f"needs {file_name} in {mt.machinetype_path}: {why}")
    return findings


def _unreadable(path: str, max_bytes: Optional[int] = None) -> Optional[str]:
    """Why the engine could not read ``path`` as a file; None if it can."""
    try:
        with open(path, "rb") as f:
            f.read(1)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return f"{path}: no such file"
    except IsADirectoryError:
        return f"{path}: is a directory, not a file"
    except OSError as error:
        return f"{path}: cannot read: {error.strerror or error}"
    if max_bytes is not None and size > max_bytes:
        return f"{path}: {size} bytes, more than the {max_bytes} the engine reads"
    return None


def _image_problem(path: str, image_format: ImageProbe) -> Optional[str]:
    try:
        image_format(path)
    except (VacFactoryError, ValueError) as error:
        text = str(error)
        return text if text.startswith(path) else f"{path}: {text}"
    return None


def keys(config: Config, locator: Locator) -> List[Finding]:
    """root_public_key readable (else VMs get no ssh key, as in Vac; a missing file at the
    default path is not worth a word: most hosts have no root key); space_key_file readable."""
    s = config.settings
    findings: List[Finding] = []
    path = s.root_public_key
    explicit = config.origins.get(table.SETTINGS, {}).get("root_public_key", "default") != "default"
    if path and (explicit or os.path.exists(path)):  # the default path missing: no key, silently
        try:
            with open(path, "rb") as f:
                text = f.read(65536).decode("ascii", "replace")
        except OSError as error:
            findings.append(locator.finding(
                WARNING, f"{path}: {error.strerror or error}: no ssh access: VMs are created without "
                         "a root key (as Vac does)", table.SETTINGS, "root_public_key"))
        else:
            if not any(_KEY_LINE.match(line.strip()) for line in text.splitlines()):
                findings.append(locator.finding(
                    WARNING, f"{path} holds no OpenSSH public key line (such as 'ssh-ed25519 AAAA...'): "
                             "no ssh access", table.SETTINGS, "root_public_key"))
    if s.space_key_file:
        from vacfactory.space.auth import load_space_key

        try:
            load_space_key(None, s.space_key_file)
        except VacFactoryError as error:
            message = getattr(error, "message", str(error))
            findings.append(locator.finding(
                ERROR, f"{s.space_key_file}: {message}: the factory can neither query nor answer "
                       "its space", table.SETTINGS, "space_key_file"))
    return findings


#: where the NFS servers' programs live on Debian and EL (systemd's PATH has them)
_SBIN_PATH = os.pathsep.join([os.defpath, "/usr/sbin", "/sbin", "/usr/local/sbin"])
#: the program each nfs_exporter runs (vmio/exports.py)
NFS_PROGRAMS = {"ganesha": "ganesha.nfsd", "exportfs": "exportfs"}


def nfs_server(config: Config, locator: Locator, search_path: str = _SBIN_PATH) -> List[Finding]:
    """A machinetype with mjf_transport = nfs needs nfs_exporter's program installed (found on
    ``search_path``), or every VM of it fails at creation when its directories are exported."""
    program = NFS_PROGRAMS.get(config.settings.nfs_exporter)
    users = [mt.name for mt in config.machinetypes.values()
             if mt.startable and mt.target_share > 0 and mt.mjf_transport == "nfs"]
    if program is None or not users or shutil.which(program, path=search_path):
        return []
    return [locator.finding(ERROR, f"{config.settings.nfs_exporter} needs {program}, which is not installed: "
                                   f"VMs of {', '.join(users)} (mjf_transport = nfs) cannot be created",
                            table.SETTINGS, "nfs_exporter")]


def _sender_cfg(config: Config, locator: Locator) -> List[Finding]:
    """apel_sender_cfg: the sender reads ssmsend's file, so check it as the sender will."""
    from vacfactory.accounting.sender_cfg import effective_broker  # the sender's own reading
    from vacfactory.accounting.settings import AccountingSettings
    from vacfactory.errors import AccountingError

    try:
        broker = effective_broker(AccountingSettings.from_config(config))
    except AccountingError as error:
        return [locator.finding(ERROR, f"{error}: apel_send cannot send; records wait in apel-outgoing",
                                table.SETTINGS, "apel_sender_cfg")]
    findings: List[Finding] = []
    for path in (broker.host_cert, broker.host_key):
        why = _unreadable(path)
        if why:
            findings.append(locator.finding(ERROR, f"{why} (from {broker.sender_cfg}): apel_send cannot sign; "
                                                   "records wait in apel-outgoing", table.SETTINGS, "apel_sender_cfg"))
    return findings


def apel_sender(config: Config, locator: Locator) -> List[Finding]:
    """With apel_send = yes the daemon signs and sends with these files; without them every
    send fails (the records wait in apel-outgoing)."""
    s = config.settings
    if not s.apel_send:
        return []
    findings: List[Finding] = []
    if getattr(s, "apel_sender_cfg", None):
        return _sender_cfg(config, locator)
    for option in ("apel_host_cert", "apel_host_key"):
        why = _unreadable(getattr(s, option))
        if why:
            findings.append(locator.finding(ERROR, f"{why}: apel_send cannot sign or connect; records wait "
                                                   "in apel-outgoing", table.SETTINGS, option))
    if s.apel_use_ssl and s.apel_capath and not os.path.exists(s.apel_capath):
        findings.append(locator.finding(ERROR, f"{s.apel_capath}: no such file or directory: apel_send cannot "
                                               "verify the broker", table.SETTINGS, "apel_capath"))
    return findings
