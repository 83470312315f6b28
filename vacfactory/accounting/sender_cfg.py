"""Read ssmsend's ``sender.cfg`` so the built-in sender goes where the site's ssmsend would.

ssmsend (apel/ssm ``bin/sender.py``) reads it with ``ConfigParser({'use_ssl': 'true'})``:

- ``[sender] protocol``: ``STOMP`` or ``AMS`` (missing: STOMP, as SSM does);
- ``[broker] host`` (both), ``port`` and ``use_ssl`` (STOMP only: for AMS SSM publishes on
  443 and exchanges the certificate for a token on 8443, whatever ``port`` says);
- ``[certificates] certificate, key, capath`` and the optional ``server_cert`` (encrypt to it);
- ``[messaging] destination`` (AMS: the topic), ``ams_project`` and ``token`` (AMS only),
  ``path`` and ``path_type`` (``dirq``; ``directory`` is not what vacfactory writes).

Every problem is an :class:`AccountingError` naming the file, the line and the option, so a
wrong value shows on the first ``vacfactory apel send`` instead of the first hourly cron run.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import replace
from typing import Optional

from vacfactory.accounting.settings import (
    AMS,
    DEFAULT_AMS_CLOUD_DESTINATION,
    DEFAULT_CLOUD_DESTINATION,
    STOMP,
    AccountingSettings,
    BrokerSettings,
)
from vacfactory.errors import AccountingError

_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_TOPIC = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class _Reader:
    """One sender.cfg: values with the file:line they came from for error messages."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.parser = configparser.ConfigParser({"use_ssl": "true"})
        try:
            with open(path, encoding="ascii") as f:
                self.text = f.read()
            self.parser.read_string(self.text, source=path)
        except (OSError, UnicodeDecodeError, configparser.Error) as error:
            raise AccountingError(f"sender.cfg {path}: cannot read: {error}") from None

    def where(self, section: str, key: str) -> str:
        """``FILE:LINE [section] key`` (the line of the key inside its section, if found)."""
        current = None
        for number, line in enumerate(self.text.splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith("[") and stripped.endswith("]"):
                current = stripped[1:-1].strip()
            elif current == section and re.match(rf"^{re.escape(key)}\s*[:=]", stripped):
                return f"{self.path}:{number}: [{section}] {key}"
        return f"{self.path}: [{section}] {key}"

    def get(self, section: str, key: str, required: bool = True) -> Optional[str]:
        try:
            value = self.parser.get(section, key).strip()
        except (configparser.NoSectionError, configparser.NoOptionError):
            if required:
                raise AccountingError(f"{self.path}: [{section}] {key} is missing (ssmsend needs it)") from None
            return None
        if re.search(r"\s[#;]", value):  # configparser keeps inline comments as part of the value
            raise AccountingError(f"{self.where(section, key)}: {value!r} holds an inline comment, "
                                  "which ssmsend would take as part of the value")
        if not value and required:
            raise AccountingError(f"{self.where(section, key)} is empty")
        return value or None

    def boolean(self, section: str, key: str) -> bool:
        try:
            return self.parser.getboolean(section, key)
        except (configparser.NoSectionError, configparser.NoOptionError):
            return True  # the use_ssl default ssmsend builds the parser with
        except ValueError:
            raise AccountingError(f"{self.where(section, key)}: not a boolean") from None


def effective_broker(settings: AccountingSettings) -> BrokerSettings:
    """The broker settings the sender uses: vacfactory.conf's, overridden by apel_sender_cfg.

    AccountingError if sender.cfg is unusable or sends from another queue than the one this
    factory writes (its records would never leave).
    """
    broker = settings.broker
    if not broker.sender_cfg:
        return broker
    broker, queue_path = read_sender_cfg(broker.sender_cfg, broker)
    if queue_path != os.path.abspath(settings.outgoing_dir):
        raise AccountingError(f"{broker.sender_cfg}: [messaging] path is {queue_path}, but this factory "
                              f"queues its records in {settings.outgoing_dir}: they would never be sent")
    return broker


def read_sender_cfg(path: str, base: BrokerSettings) -> "tuple[BrokerSettings, str]":
    """(``base`` with sender.cfg's values, the queue path sender.cfg sends from)."""
    cfg = _Reader(path)
    protocol = (cfg.get("sender", "protocol", required=False) or STOMP).upper()
    if protocol not in (STOMP, AMS):
        raise AccountingError(f"{cfg.where('sender', 'protocol')}: {protocol!r} is neither STOMP nor AMS")
    host = cfg.get("broker", "host")
    assert host is not None
    if not _HOST.match(host):
        raise AccountingError(f"{cfg.where('broker', 'host')}: {host!r} is not a host name")
    destination = cfg.get("messaging", "destination")
    assert destination is not None
    path_type = cfg.get("messaging", "path_type", required=False) or "dirq"
    if path_type != "dirq":
        raise AccountingError(f"{cfg.where('messaging', 'path_type')}: {path_type!r}: vacfactory queues "
                              "in dirq layout, so the built-in sender reads path_type: dirq only")
    queue_path = cfg.get("messaging", "path")
    assert queue_path is not None
    changes = dict(
        protocol=protocol, host=host, destination=destination, sender_cfg=path,
        host_cert=cfg.get("certificates", "certificate"), host_key=cfg.get("certificates", "key"),
        capath=cfg.get("certificates", "capath", required=False) or base.capath,
        server_cert=cfg.get("certificates", "server_cert", required=False),
    )
    if protocol == AMS:
        project = cfg.get("messaging", "ams_project")
        for key, value in (("destination", destination), ("ams_project", project)):
            if not _TOPIC.match(value or ""):
                raise AccountingError(f"{cfg.where('messaging', key)}: {value!r} is not an AMS name "
                                      "(letters, digits, '_', '.', '-')")
        changes.update(ams_project=project, ams_token=cfg.get("messaging", "token", required=False),
                       use_ssl=True)
        if base.cloud_destination == DEFAULT_CLOUD_DESTINATION:  # a STOMP queue means nothing to AMS
            changes.update(cloud_destination=DEFAULT_AMS_CLOUD_DESTINATION)
    else:
        port_text = cfg.get("broker", "port")
        try:
            port = int(port_text or "")
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            raise AccountingError(f"{cfg.where('broker', 'port')}: {port_text!r} is not a port")
        changes.update(port=port, use_ssl=cfg.boolean("broker", "use_ssl"))
    if changes["server_cert"] and not os.path.isfile(str(changes["server_cert"])):
        raise AccountingError(f"{cfg.where('certificates', 'server_cert')}: {changes['server_cert']} "
                              "does not exist")
    return replace(base, **changes), os.path.abspath(queue_path)  # type: ignore[arg-type]
