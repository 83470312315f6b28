"""Configuration: the option table, loading and validation (see docs/configuration.md).

``load_config(ConfigSources.default())`` gives a frozen :class:`Config`;
:class:`ConfigWatcher` keeps the last good one while the files change under a running daemon.
"""

from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import (
    ConfigSources,
    ConfigWatcher,
    PollResult,
    load_config,
    load_config_string,
)
from vacfactory.config.model import Config, MachineType, Settings, SourceStamp, VacuumPipe

__all__ = [
    "Config",
    "ConfigSources",
    "ConfigWatcher",
    "HostFacts",
    "MachineType",
    "PollResult",
    "Settings",
    "SourceStamp",
    "VacuumPipe",
    "load_config",
    "load_config_string",
]
