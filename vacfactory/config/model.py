"""The validated configuration: frozen values the rest of vacfactory reads.

``Settings``, ``MachineType`` and ``VacuumPipe`` are frozen dataclasses with one typed
attribute per canonical option name of the option table (``config/options.py``), in table
order, so a type checker sees every option and a mistyped name (``settings.total_procesors``)
is an error before it runs. tests/unit/test_config_model.py checks them against the table:
every option a field, of the type its value type parses to (Optional when the option may be
unset), and a loaded configuration holds the table's defaults in them. Adding a row to the
table therefore means adding its field here (the test names it). Unset optional options are
None; list options are tuples; mappings are read-only. The classes have no defaults of their
own: the loader applies the table's (some are computed from the host or other options).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, List, Mapping, Optional, Tuple, Union

from vacfactory.config import options as table


@dataclass(frozen=True)
class Settings:
    """The [settings] section: one attribute per option (see docs/configuration.md), plus
    user_data_options / user_data_files (defaults for every machinetype, unresolved paths)
    and machinefeatures_options."""

    vac_space: str
    factory_name: str
    factories: Tuple[str, ...]
    description: Optional[str]
    udp_timeout_seconds: float
    udp_port: int
    space_key: Optional[str] = field(repr=False)
    space_key_file: Optional[str]
    domain_type: str
    libvirt_uri: str
    container_socket: str
    container_stop_seconds: int
    cpu_mode: str
    total_processors: int
    total_memory_mb: Optional[int]
    mb_per_processor: int
    hs06_per_processor: Optional[float]
    processors_per_superslot: int
    overload_per_processor: float
    disk_gb_per_processor: Optional[int]
    volume_group: Optional[str]
    root_public_key: str
    singularity_user: Optional[str]
    state_dir: str
    pipes_cache_dir: str
    image_cache_dir: str
    log_to: str
    log_file: str
    cycle_seconds: float
    max_starting_processors: int
    starting_seconds: float
    shutdown_time: Optional[int]
    draining: bool
    abort_on_700: bool
    grace_seconds: int
    fix_networking: bool
    network_name: str
    network_bridge: str
    forward_dev: Optional[str]
    http_port: int
    nfs_exporter: str
    joboutputs_nfs_filesystem: str
    joboutputs_max_file_bytes: int
    joboutputs_max_total_bytes: int
    joboutputs_max_files: int
    syslog_server: str
    syslog_forward: Optional[str]
    syslog_days: float
    syslog_max_bytes_per_vm: int
    syslog_rate_per_vm: float
    syslog_burst_per_vm: int
    keep_on_abnormal_end: bool
    keep_days: float
    keep_max_overlays: int
    gocdb_sitename: Optional[str]
    gocdb_cert_file: Optional[str]
    gocdb_key_file: Optional[str]
    accounting_benchmark: str
    apel_infrastructure_description: str
    apel_infrastructure_type: str
    apel_cloud_records: bool
    apel_send: bool
    apel_broker_host: Optional[str]
    apel_broker_port: int
    apel_destination: str
    apel_cloud_destination: str
    apel_use_ssl: bool
    apel_host_cert: str
    apel_host_key: str
    apel_capath: str
    apel_send_interval_seconds: int
    apel_sender_cfg: Optional[str]
    apel_batch: bool
    apel_batch_records: int
    version_logger: int
    vacmon_hostport: Tuple[str, ...]
    metrics_port: int
    metrics_address: str
    check_disk_free_warning_mb: int
    check_disk_free_critical_mb: int
    check_apel_backlog_warning_seconds: int
    pipe_ca_path: Optional[str]
    pipe_fetch_timeout_seconds: float
    image_fetch_timeout_seconds: float
    image_check_seconds: float
    internal_url_hosts: Tuple[str, ...]
    image_max_download_gb: float
    image_download_reserve_mb: int
    max_root_image_gb: Optional[float]
    adaptive_backoff: bool
    adaptive_backoff_max_seconds: int
    rebalance: bool
    rebalance_notice_seconds: int
    rebalance_max_percent: float
    user_data_options: Mapping[str, str]
    user_data_files: Mapping[str, str]
    machinefeatures_options: Mapping[str, str]


@dataclass(frozen=True)
class MachineType:
    """One [machinetype NAME] section with defaults applied: one attribute per option, plus
    name, startable (False for container models vacfactory does not run), and
    user_data_options / user_data_files merged over the [settings] ones (the machinetype
    wins; file paths resolved against <machinetype_path>/files/)."""

    name: str
    startable: bool
    target_share: float
    machine_model: str
    root_image: Optional[str]
    root_image_sha256: Optional[str]
    kernel_image: Optional[str]
    initrd_image: Optional[str]
    kernel_cmdline: Optional[str]
    user_data: Optional[str]
    machinetype_path: str
    root_device: str
    scratch_device: str
    container_command: str
    tmp_binds: Tuple[str, ...]
    cvmfs_repositories: Tuple[str, ...]
    disk_gb_per_processor: Optional[int]
    min_processors: int
    max_processors: int
    max_wallclock_seconds: int
    min_wallclock_seconds: int
    backoff_seconds: int
    fizzle_seconds: int
    heartbeat_file: Optional[str]
    heartbeat_seconds: int
    accounting_fqan: Optional[str]
    machinegroup: str
    machines_dir_days: float
    image_signing_dn: Optional[str]
    user_data_proxy: bool
    legacy_proxy: bool
    mjf_transport: str
    config_drive: bool
    user_data_options: Mapping[str, str]
    user_data_files: Mapping[str, str]


@dataclass(frozen=True)
class VacuumPipe:
    """One [vacuum_pipe PREFIX] section. ``options`` holds the other (machinetype) options as
    validated raw text under their canonical names: they are defaults for the machinetypes
    the pipe defines, merged with the pipe's JSON when it is expanded."""

    prefix: str
    vacuum_pipe_url: str
    target_share: float
    options: Mapping[str, str]

    @property
    def url(self) -> str:
        """The vacuum_pipe_url."""
        return self.vacuum_pipe_url


@dataclass(frozen=True)
class SourceStamp:
    """Identity of one configuration file when it was read: a change means re-read it.

    ``mtime_ns``, ``size`` and ``inode`` are None when the file did not exist (a missing runtime
    override is recorded too, so that its appearance is noticed). The inode catches an editor
    that renames a new file into place within one mtime tick and with the same size.
    """

    path: str
    mtime_ns: Optional[int]
    size: Optional[int]
    inode: Optional[int] = None

    @property
    def exists(self) -> bool:
        return self.mtime_ns is not None


@dataclass(frozen=True)
class Config:
    """A whole validated configuration."""

    settings: Settings
    #: machinetypes in configuration order
    machinetypes: Mapping[str, MachineType]
    vacuum_pipes: Mapping[str, VacuumPipe]
    #: deprecation and other warnings, formatted like errors (file:line: [section] option: ...)
    warnings: Tuple[str, ...]
    #: every file consulted (including absent ones whose appearance matters)
    sources: Tuple[SourceStamp, ...]
    #: section title ("settings", "machinetype lhcb", ...) -> option -> "file:line" or "default"
    origins: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class EffectiveOption:
    """One option's effective value, for `vacfactory config show` and logs."""

    name: str
    #: the value as it would be written in a file ("" when unset; masked when secret)
    text: str
    #: the parsed value (None when unset or secret), JSON-friendly
    value: Any
    #: "file:line", "default", or "settings" for values inherited from [settings]
    origin: str
    is_set: bool


SECRET_MASK = "********"


def effective_options(config: Config) -> List[Tuple[str, List[EffectiveOption]]]:
    """Every section's options in table order with value and origin (secrets masked)."""
    sections: List[Tuple[str, List[EffectiveOption]]] = []
    settings_title = table.SETTINGS
    sections.append((settings_title, _effective(config, settings_title, table.SETTINGS, config.settings, None)))
    for name, machinetype in config.machinetypes.items():
        title = f"{table.MACHINETYPE} {name}"
        sections.append((title, _effective(config, title, table.MACHINETYPE, machinetype, None)))
    for prefix, pipe in config.vacuum_pipes.items():
        title = f"{table.VACUUM_PIPE} {prefix}"
        sections.append((title, _effective(config, title, table.VACUUM_PIPE, pipe, pipe.options)))
    return sections


def _effective(config: Config, title: str, kind: str, obj: Union[Settings, MachineType, VacuumPipe],
               raw_options: Optional[Mapping[str, str]]) -> List[EffectiveOption]:
    origins = config.origins.get(title, {})
    rows: List[EffectiveOption] = []
    for row in table.options_of(kind):
        value = getattr(obj, row.name)
        origin = origins.get(row.name, "default")
        if value is None:
            rows.append(EffectiveOption(row.name, "", None, origin, False))
        elif row.secret:
            rows.append(EffectiveOption(row.name, SECRET_MASK, None, origin, True))
        else:
            shown = list(value) if isinstance(value, tuple) else value
            rows.append(EffectiveOption(row.name, row.type.format(value), shown, origin, True))
    for family in table.families_of(kind):
        for suffix, value in getattr(obj, family.attribute, {}).items():
            name = family.prefix + suffix
            rows.append(EffectiveOption(name, str(value), value, origins.get(name, "settings"), True))
    for name, text in (raw_options or {}).items():
        rows.append(EffectiveOption(name, text, text, origins.get(name, "default"), True))
    return rows


def frozen_mapping(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """A read-only view of a copy of ``mapping`` (keeps insertion order)."""
    return MappingProxyType(dict(mapping))
