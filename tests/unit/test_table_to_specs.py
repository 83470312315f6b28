"""Every value the option table accepts goes through the specs the engine builds from it.

The table (config/options.py) and the hypervisor specs (hypervisor/base.py, network.py) share
the rules of core/values.py; this test shows the agreement from the outside. Hypothesis draws
text for one option from that option's own value type (``accepted_text``: candidates made from
the type's pattern or kind, kept when the type's parser takes them), the loader loads a
configuration with it, and the engine's own builders make the VM's record, its MJF files, its
machine directory with real qcow2 disks (qemu-img), its domain spec and the network spec. A
spec refusing (InvalidValue, or any other ValueError) fails the test: it is the bug of issue 15,
where the table accepted root_device = xvda and DiskSpec refused it inside the engine loop.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid as uuidlib
from typing import Iterator

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from tests.unit.engine_harness import HOST
from vacfactory.config import options as table
from vacfactory.config.loader import load_config_string
from vacfactory.config.parsers import (
    Boolean, Choice, Integer, Location, Number, Path, RegexText, Text, ValueType, Words,
)
from vacfactory.core import values
from vacfactory.daemon import network_spec
from vacfactory.engine.naming import domain_name
from vacfactory.engine.vmbuild import BuildError, VMBuilder
from vacfactory.errors import ConfigErrors, ImageError
from vacfactory.hypervisor.base import ContainerSpec
from vacfactory.hypervisor.domainxml import domain_xml
from vacfactory.state.machines import MachineStore

#: options whose value names a file the engine reads while building: a value the test did not
#: create a file for gives a BuildError (no such file), which is the engine's clear refusal
FILE_OPTIONS = {"root_image", "kernel_image", "initrd_image", "user_data", "machinetype_path", "user_data_proxy"}
#: the test's own place on disk and how the builders reach the test driver
FIXED = {table.STATE_DIR, "libvirt_uri", "log_file"}

# --------------------------------------------------------------------------- strategies
_NAMEISH = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+:/", min_size=1,
                   max_size=140)
#: disk-like names: virtio ones, IDE ones (only a-d fit), and names libvirt places nowhere
_DEVICE_CANDIDATES = (r"(vd|xvd)[a-z]{1,2}", r"(sd|hd)[a-z]{1,2}", r"(fd|vd|nvme)[a-z0-9]{1,3}")
#: candidates for values a rule of core/values.py decides (broader than each rule)
_CHECK_CANDIDATES = {
    values.check_guest_disk_device: st.one_of(*(st.from_regex(p, fullmatch=True) for p in _DEVICE_CANDIDATES)),
    values.check_factory_name: st.one_of(st.from_regex(values.FQDN_PATTERN, fullmatch=True), _NAMEISH),
    values.check_network_name: st.one_of(st.from_regex(r"[A-Za-z0-9_.-]{1,70}", fullmatch=True), _NAMEISH),
    values.check_interface_name: st.one_of(st.from_regex(r"[A-Za-z0-9_.-]{1,17}", fullmatch=True), _NAMEISH),
    values.command_words: st.one_of(st.from_regex(r"/?[A-Za-z0-9_.-]{1,12}( [A-Za-z0-9_.-]{1,8}){0,3}", fullmatch=True),
                                    st.from_regex(r"[a-z]{1,6} '[a-z ]{0,6}'? ?\"[a-z ]{0,6}", fullmatch=True)),
}
_PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x17f, blacklist_categories=("Cs",)),
                     max_size=60)
_PATHISH = st.from_regex(r"/?([A-Za-z0-9_.-]{1,12}/){0,3}[A-Za-z0-9_.-]{1,12}", fullmatch=True)


def candidates(vtype: ValueType) -> st.SearchStrategy[str]:
    """Text shaped like the values of ``vtype`` (not all of it accepted)."""
    if isinstance(vtype, Boolean):
        return st.sampled_from(["yes", "No", "TRUE", "off", "1", "0"])
    if isinstance(vtype, Choice):
        return st.sampled_from(vtype.choices).map(lambda c: c.upper() if len(c) % 2 else c)
    if isinstance(vtype, Integer):
        low = vtype.min if vtype.min is not None else -10**6
        return st.integers(low, vtype.max if vtype.max is not None else max(low, 0) + 10**6).map(str)
    if isinstance(vtype, Number):
        return st.floats(vtype.min if vtype.min is not None else -1e6, vtype.max if vtype.max is not None else 1e6,
                         allow_nan=False).map(repr)
    if isinstance(vtype, Text) and vtype.check is not None:
        return _CHECK_CANDIDATES[vtype.check]
    if isinstance(vtype, Text) and vtype.pattern is not None:
        return st.from_regex(vtype.pattern, fullmatch=True)
    if isinstance(vtype, Text):
        return _PRINTABLE
    if isinstance(vtype, (Path, Location)):
        urls = st.sampled_from(("http://h.example.org/", "https://h.example.org/a", "docker://r/i", "file:///p"))
        return st.one_of(_PATHISH, st.tuples(urls, _PATHISH).map("".join))
    if isinstance(vtype, Words):
        return st.lists(candidates(vtype.item), max_size=3).map(" ".join)
    if isinstance(vtype, RegexText):
        return st.sampled_from(["^/DC=ch/.*", "[a-z]+", "x|y"])
    raise AssertionError(f"no strategy for {vtype!r}: add one")


def _accepts(vtype: ValueType, text: str) -> bool:
    try:
        vtype.parse(text)
    except ValueError:
        return False
    return "\n" not in text and text == text.strip() and "#" not in text and ";" not in text


def accepted_text(vtype: ValueType) -> st.SearchStrategy[str]:
    """Text the option table accepts for ``vtype`` (as a one-line value in a file)."""
    return candidates(vtype).filter(lambda text: _accepts(vtype, text))


def drawn_options(section: str) -> list:
    return [row for row in table.options_of(section) if row.name not in FIXED and not row.ignored]


# --------------------------------------------------------------------------- the site
@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    """A state directory with a vm-raw machinetype's base image and a kernel (module-wide:
    hypothesis runs many examples per test)."""
    root = tempfile.mkdtemp(prefix="vf-specs-")
    files = os.path.join(root, "state", "machinetypes", "m", "files")
    os.makedirs(files)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", os.path.join(files, "base.img"), "1M"], check=True)
    with open(os.path.join(files, "vmlinux"), "wb") as f:
        f.write(b"\x7fELF")
    yield root
    shutil.rmtree(root)


def configuration(root: str, settings_lines: str, machinetype_lines: str, model: str) -> str:
    return (f"[settings]\nvac_space = space.example.org\nfactory_name = f1.example.org\n"
            f"state_dir = {root}/state\nlibvirt_uri = test:///default\ndomain_type = test\n"
            f"total_processors = 4\nmb_per_processor = 100\ndisk_gb_per_processor = 1\n{settings_lines}"
            f"[machinetype m]\ntarget_share = 1\nmachine_model = {model}\n"
            f"root_image = {'docker://localhost/pilot:1' if model == 'docker' else 'base.img'}\n"
            f"{machinetype_lines}")


def build_every_spec(root: str, text: str, option: str) -> None:
    """Load ``text`` and build what the engine builds for a VM of machinetype m in the last slot."""
    try:
        config = load_config_string(text, HOST, source="drawn.conf")
    except ConfigErrors as errors:
        # a value broke a rule between options (a min above a max...): a located ConfigError
        event("refused by a rule between options")
        assume(False)
        raise AssertionError("unreachable") from errors
    mt = config.machinetypes["m"]
    assume(mt.startable)
    spec_of_network = network_spec(config)
    assert spec_of_network.name == config.settings.network_name
    slot = config.settings.total_processors - 1
    builder = VMBuilder(config.settings.state_dir, container_images=lambda reference: None)
    try:
        record = builder.new_record(config, mt, uuid=str(uuidlib.uuid4()), slot=slot,
                                    name=domain_name(config.settings.factory_name, slot),
                                    processors=max(1, min(mt.min_processors, 8)),
                                    created=1.8e9, shutdown_time=1.8e9 + 3600)
        machine = MachineStore(config.settings.state_dir).prepare(record, *builder.features(config, record), None)
        try:
            spec = builder.machine_spec(config, mt, machine)
            if isinstance(spec, ContainerSpec):
                event(f"built: a container with {len(spec.binds)} binds")
                assert spec.binds[0].source == machine.joboutputs_dir
            else:
                assert domain_xml(spec).startswith("<domain")
                event(f"built: {len(spec.disks)} disks")
                assert spec.disks[-1 if mt.config_drive else 0].path.startswith(config.settings.state_dir)
        finally:
            shutil.rmtree(machine.path)
    except (BuildError, ImageError) as error:
        # the engine's own clear refusal of a file that is not there (never a spec's)
        assert option in FILE_OPTIONS, f"{option}: {error}"
        event("a file the test did not make")


def _draw_and_build(root: str, section: str, data: st.DataObject, model: str) -> None:
    row = data.draw(st.sampled_from(drawn_options(section)), label="option")
    text = data.draw(accepted_text(row.type), label=row.name)
    line = f"{row.name} = {text}\n"
    if section == table.SETTINGS:
        build_every_spec(root, configuration(root, line, "", model), row.name)
    else:
        build_every_spec(root, configuration(root, "", line, model), row.name)


_SETTINGS = settings(max_examples=25, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                            HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(data=st.data(), model=st.sampled_from(table.VM_MODELS + table.STARTED_CONTAINER_MODELS))
def test_every_settings_value_the_table_accepts_goes_through_the_specs(site, data, model):
    _draw_and_build(site, table.SETTINGS, data, model)


@_SETTINGS
@given(data=st.data(), model=st.sampled_from(table.VM_MODELS + table.STARTED_CONTAINER_MODELS))
def test_every_machinetype_value_the_table_accepts_goes_through_the_specs(site, data, model):
    _draw_and_build(site, table.MACHINETYPE, data, model)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.filter_too_much])
@given(root_device=accepted_text(table.accepted_options(table.MACHINETYPE)["root_device"].type),
       scratch_device=accepted_text(table.accepted_options(table.MACHINETYPE)["scratch_device"].type),
       model=st.sampled_from(table.VM_MODELS), config_drive=st.booleans())
def test_every_disk_layout_the_table_accepts_makes_a_domain_spec(site, root_device, scratch_device, model,
                                                                 config_drive):
    """The devices together: the table refuses the layouts whose disks would share a place."""
    lines = (f"root_device = {root_device}\nscratch_device = {scratch_device}\n"
             f"config_drive = {'yes' if config_drive else 'no'}\n")
    build_every_spec(site, configuration(site, "", lines, model), "root_device")


def test_every_option_type_has_a_strategy():
    for section in (table.SETTINGS, table.MACHINETYPE):
        for row in drawn_options(section):
            assert candidates(row.type) is not None, row.name


def test_the_device_strategy_covers_the_names_issue_15_was_about():
    """xvda (the bug), two-letter virtio names and the IDE names are among the candidates the
    strategy draws from, and the table accepts them: the sweeps above can reach them."""
    device_type = table.accepted_options(table.MACHINETYPE)["root_device"].type
    for name in ("xvda", "xvdzz", "vdaa", "vda", "hdd", "sdc"):
        assert any(re.fullmatch(p, name) for p in _DEVICE_CANDIDATES) and _accepts(device_type, name), name
    for name in ("hde", "sdz", "fda", "vda1"):
        assert any(re.fullmatch(p, name) for p in _DEVICE_CANDIDATES) and not _accepts(device_type, name), name
