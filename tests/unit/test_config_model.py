"""The typed configuration (config/model.py) against the option table (config/options.py)."""

from __future__ import annotations

import dataclasses
import glob
import os
import typing
from typing import Any, Mapping, Optional

import pytest

from vacfactory.config import options as table
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, load_config, load_config_string
from vacfactory.config.model import Config, MachineType, Settings, VacuumPipe
from vacfactory.config.options import Computed

HOST = HostFacts(fqdn="wn01.example.com", cpu_count=8, mem_total_mb=16384)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: fields that are not options, per class
EXTRA = {Settings: {}, MachineType: {"name": str, "startable": bool},
         VacuumPipe: {"prefix": str, "options": Mapping[str, str]}}
SECTION = {Settings: table.SETTINGS, MachineType: table.MACHINETYPE, VacuumPipe: table.VACUUM_PIPE}


def expected_type(row: table.Option) -> Any:
    """The type a row's values have: what its value type parses to, Optional if it may be unset."""
    python = row.type.python_type
    return Optional[python] if row.default is None and not row.required else python


def expected_fields(cls: type) -> dict:
    section = SECTION[cls]
    fields = dict(EXTRA[cls])
    for row in table.options_of(section):
        fields[row.name] = expected_type(row)
    if cls is not VacuumPipe:
        fields.update({family.attribute: Mapping[str, str] for family in table.families_of(section)})
    return fields


@pytest.mark.parametrize("cls", [Settings, MachineType, VacuumPipe])
def test_every_option_is_a_field_of_its_type_in_table_order(cls):
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    wanted = expected_fields(cls)
    missing = [name for name in wanted if name not in fields]
    assert missing == [], f"add to {cls.__name__} in config/model.py: {missing}"
    assert [name for name in fields if name not in wanted] == []
    assert {name: hints[name] for name in fields} == wanted
    options = [row.name for row in table.options_of(SECTION[cls])]
    assert [name for name in fields if name in options] == options


def test_the_classes_are_frozen_and_secrets_stay_out_of_repr():
    for cls in (Settings, MachineType, VacuumPipe):
        assert cls.__dataclass_params__.frozen
    secret = {row.name for row in table.OPTIONS if row.secret}
    assert secret and all(not f.repr for f in dataclasses.fields(Settings) if f.name in secret)
    assert all(f.repr for f in dataclasses.fields(Settings) if f.name not in secret)


def test_config_is_typed():
    hints = typing.get_type_hints(Config)
    assert (hints["settings"], hints["machinetypes"], hints["vacuum_pipes"]) == \
        (Settings, Mapping[str, MachineType], Mapping[str, VacuumPipe])


def test_a_minimal_configuration_holds_every_static_default_of_the_table():
    config = load_config_string("[settings]\nvac_space = v.example.org\n"
                                "[machinetype m]\nroot_image = /i.img\n", HOST)
    for obj, section in ((config.settings, table.SETTINGS), (config.machinetypes["m"], table.MACHINETYPE)):
        for row in table.options_of(section):
            if row.name in ("vac_space", "root_image") or isinstance(row.default, Computed):
                continue
            assert getattr(obj, row.name) == row.default, row.name


def _holds(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return any(_holds(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if origin is not None:  # Mapping[str, str]
        return isinstance(value, typing.get_origin(annotation)) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation) and (annotation is bool or not isinstance(value, bool))


def _shipped_configurations():
    return sorted(glob.glob(os.path.join(REPO, "conf", "*.conf")))


@pytest.mark.parametrize("path", _shipped_configurations(), ids=os.path.basename)
def test_loaded_values_have_their_fields_types(path, tmp_path):
    config = load_config(ConfigSources.for_main_file(path), host_facts=HOST)
    assert_typed(config, path)


@pytest.mark.parametrize("name", ["EXAMPLE_VAC_CONF", "SITE_EVERY_OPTION", "SITE_LEGACY_NAMES"])
def test_a_vac_sites_values_have_their_fields_types_too(name):
    """Vac readings (vac_parse) give values of the same types, never a Noted or a sentinel."""
    from tests.unit import test_vac_corpus

    config = load_config_string(getattr(test_vac_corpus, name), test_vac_corpus.HOST, vac=True)
    assert_typed(config, name)


def assert_typed(config: Config, where: str) -> None:
    objects = [config.settings, *config.machinetypes.values(), *config.vacuum_pipes.values()]
    assert len(objects) >= 2
    for obj in objects:
        for name, annotation in typing.get_type_hints(type(obj)).items():
            assert _holds(getattr(obj, name), annotation), (where, type(obj).__name__, name, getattr(obj, name))
