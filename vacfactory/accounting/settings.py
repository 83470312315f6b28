"""What accounting needs from the configuration, as one frozen value.

The engine and the CLI build it with :meth:`AccountingSettings.from_config`; everything in
``vacfactory.accounting`` takes this value and never the whole ``Config``, so each piece can
be tested alone with a temporary directory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from vacfactory.config.model import Config
from vacfactory.core.apel import (
    DEFAULT_INFRASTRUCTURE_DESCRIPTION,
    DEFAULT_INFRASTRUCTURE_TYPE,
    RecordIdentity,
    canonical_benchmark_type,
    placeholder_site,
)
from vacfactory.errors import AccountingError, RecordInvalid

log = logging.getLogger(__name__)

DEFAULT_DESTINATION = "gLite-APEL"
#: the apel_cloud_destination default (a STOMP queue, like the option apel_destination)
DEFAULT_CLOUD_DESTINATION = "/queue/global.accounting.cloud.CENTRAL"
DEFAULT_CAPATH = "/etc/grid-security/certificates"
DEFAULT_SEND_INTERVAL_SECONDS = 3600.0
STOMP = "STOMP"
AMS = "AMS"
DEFAULT_AMS_PROJECT = "accounting"
#: the AMS topic of cloud records (the grid topic is DEFAULT_DESTINATION)
DEFAULT_AMS_CLOUD_DESTINATION = "eu-egi-cloud-accounting"
DEFAULT_BATCH_RECORDS = 500


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how the built-in sender delivers (the same things ssmsend's sender.cfg says)."""

    host: Optional[str] = None
    port: int = 61613
    destination: str = DEFAULT_DESTINATION
    cloud_destination: str = DEFAULT_CLOUD_DESTINATION
    use_ssl: bool = True
    host_cert: str = "/etc/grid-security/hostcert.pem"
    host_key: str = "/etc/grid-security/hostkey.pem"
    #: a directory of CA certificates (hashed or *.pem) or one CA bundle file
    capath: str = DEFAULT_CAPATH
    send_interval_seconds: float = DEFAULT_SEND_INTERVAL_SECONDS
    #: the daemon runs the built-in sender on a timer (otherwise ssmsend from cron does)
    send_enabled: bool = False
    #: ``STOMP`` or ``AMS`` (sender.cfg ``[sender] protocol``)
    protocol: str = STOMP
    #: AMS only: the project (sender.cfg ``[messaging] ams_project``)
    ams_project: str = DEFAULT_AMS_PROJECT
    #: AMS only: a token instead of the X.509-to-token exchange (``[messaging] token``)
    ams_token: Optional[str] = None
    #: AMS: the X.509 token exchange port (SSM: always 8443); publishing is on 443
    ams_authn_port: int = 8443
    #: AMS: the library's per-request timeout, re-sends after a 5xx/reset/timeout, and the
    #: sleep before each (SSM's values); re-sends are skipped when the deadline is too near
    ams_timeout_seconds: float = 10.0
    ams_retry: int = 1
    ams_retry_sleep_seconds: float = 60.0
    #: encrypt each signed message to this certificate (``[certificates] server_cert``)
    server_cert: Optional[str] = None
    #: the sender.cfg these values came from, None if from vacfactory.conf alone
    sender_cfg: Optional[str] = None
    #: pack up to this many job records into one message (0: one message per element)
    batch_records: int = 0


@dataclass(frozen=True)
class AccountingSettings:
    """Identity, switches and paths of this factory's accounting."""

    site: str
    space: str
    factory: str
    archive_dir: str
    outgoing_dir: str
    benchmark_type: str = "HEPSPEC"
    infrastructure_description: str = DEFAULT_INFRASTRUCTURE_DESCRIPTION
    infrastructure_type: str = DEFAULT_INFRASTRUCTURE_TYPE
    #: also write APEL-cloud-message v0.4 records (to their own archive and queue)
    cloud_records: bool = False
    #: None: a sibling ``apel-cloud-outgoing`` of outgoing_dir
    cloud_outgoing_dir: Optional[str] = None
    #: Vac's rule: records are queued for sending only with gocdb_sitename and hs06 set
    queue_enabled: bool = True
    #: why queue_enabled is False, for the one log line and ``apel status``
    queue_disabled_reason: Optional[str] = None
    broker: BrokerSettings = field(default_factory=BrokerSettings)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "benchmark_type", canonical_benchmark_type(self.benchmark_type))
        except RecordInvalid as error:
            raise AccountingError(f"accounting_benchmark: {error}") from None

    @property
    def identity(self) -> RecordIdentity:
        return RecordIdentity(
            site=self.site,
            space=self.space,
            factory=self.factory,
            benchmark_type=self.benchmark_type,
            infrastructure_description=self.infrastructure_description,
            infrastructure_type=self.infrastructure_type,
        )

    @property
    def submit_host(self) -> str:
        return self.identity.submit_host

    @property
    def cloud_queue_dir(self) -> str:
        if self.cloud_outgoing_dir:
            return self.cloud_outgoing_dir
        parent = os.path.dirname(os.path.abspath(self.outgoing_dir))
        return os.path.join(parent, "apel-cloud-outgoing")

    @classmethod
    def from_config(cls, config: Config) -> "AccountingSettings":
        """Map the configuration's ``[settings]`` options onto accounting.

        Site is ``gocdb_sitename``, else Vac's placeholder (the space minus its first label).
        Records are queued only when ``gocdb_sitename`` and ``hs06_per_processor`` are both
        set, as in Vac: without them APEL would reject the site or get made-up benchmarks.
        """
        s = config.settings
        space = str(s.vac_space)
        gocdb = _opt(s, "gocdb_sitename")
        hs06 = _opt(s, "hs06_per_processor")
        reasons = []
        if not gocdb:
            reasons.append("gocdb_sitename is not set")
        if hs06 is None:
            reasons.append("hs06_per_processor is not set")
        state_dir = str(s.state_dir)
        broker = BrokerSettings(
            host=_opt(s, "apel_broker_host"),
            port=int(_opt(s, "apel_broker_port", 61613)),
            destination=str(_opt(s, "apel_destination", DEFAULT_DESTINATION)),
            cloud_destination=str(_opt(s, "apel_cloud_destination", DEFAULT_CLOUD_DESTINATION)),
            use_ssl=bool(_opt(s, "apel_use_ssl", True)),
            host_cert=str(_opt(s, "apel_host_cert", BrokerSettings.host_cert)),
            host_key=str(_opt(s, "apel_host_key", BrokerSettings.host_key)),
            capath=str(_opt(s, "apel_capath", DEFAULT_CAPATH)),
            send_interval_seconds=float(_opt(s, "apel_send_interval_seconds", DEFAULT_SEND_INTERVAL_SECONDS)),
            send_enabled=bool(_opt(s, "apel_send", False)),
            batch_records=int(_opt(s, "apel_batch_records", DEFAULT_BATCH_RECORDS)) if _opt(s, "apel_batch", False)
            else 0,
            # read by the sender itself (accounting.sender_cfg): a broken sender.cfg must never
            # stop VMs from being accounted
            sender_cfg=_opt(s, "apel_sender_cfg"),
        )
        return cls(
            site=str(gocdb) if gocdb else placeholder_site(space),
            space=space,
            factory=str(s.factory_name),
            archive_dir=os.path.join(state_dir, "apel-archive"),
            outgoing_dir=os.path.join(state_dir, "apel-outgoing"),
            cloud_outgoing_dir=os.path.join(state_dir, "apel-cloud-outgoing"),
            benchmark_type=str(_opt(s, "accounting_benchmark", "HEPSPEC")),
            infrastructure_description=str(
                _opt(s, "apel_infrastructure_description", DEFAULT_INFRASTRUCTURE_DESCRIPTION)
            ),
            infrastructure_type=str(_opt(s, "apel_infrastructure_type", DEFAULT_INFRASTRUCTURE_TYPE)),
            cloud_records=bool(_opt(s, "apel_cloud_records", False)),
            queue_enabled=not reasons,
            queue_disabled_reason=" and ".join(reasons) or None,
            broker=broker,
        )


def _opt(settings: Any, name: str, default: Any = None) -> Any:
    """An option's value, or ``default`` when it is unset (None) or unknown to this config."""
    value = getattr(settings, name, None)
    return default if value is None else value
