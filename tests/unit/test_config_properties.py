"""Property tests: whatever an admin (or a pipe) writes, the loader fails only with ConfigError."""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vacfactory.config import options as table
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, load_config, load_config_string
from vacfactory.config.parsers import Boolean, Integer, Number
from vacfactory.errors import ConfigError

HOST = HostFacts(fqdn="wn01.example.com", cpu_count=8, mem_total_mb=16384)

SETTINGS_NAMES = [o.name for o in table.options_of(table.SETTINGS) if o.name != table.STATE_DIR]
SETTINGS_NAMES += [a for o in table.options_of(table.SETTINGS) for a in o.aliases]
SETTINGS_NAMES += ["user_data_option_x", "user_data_file_y", "machinefeatures_option_z", "no_such_option"]
MT_NAMES = [o.name for o in table.options_of(table.MACHINETYPE)]
MT_NAMES += [a for o in table.options_of(table.MACHINETYPE) for a in o.aliases] + ["user_data_option_q"]

# Any text without surrogates (which cannot be written as UTF-8), including newlines and '['.
VALUES = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


def _load(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vacfactory.conf")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace("@STATE@", tmp))
        try:
            load_config(ConfigSources.for_main_file(path), host_facts=HOST)
        except ConfigError:
            pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(SETTINGS_NAMES), value=VALUES)
def test_any_settings_value_fails_only_with_config_error(name, value):
    _load(f"[settings]\nvac_space = vac01.example.com\nstate_dir = @STATE@\n{name} = {value}\n")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(MT_NAMES), value=VALUES, pipe=st.booleans())
def test_any_machinetype_or_pipe_value_fails_only_with_config_error(name, value, pipe):
    header = "[vacuum_pipe p]\nvacuum_pipe_url = https://x.example.com/p\n" if pipe else "[machinetype m]\nroot_image = m.iso\n"
    _load(f"[settings]\nvac_space = vac01.example.com\nstate_dir = @STATE@\n{header}{name} = {value}\n")


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_any_file_content_fails_only_with_config_error(text):
    try:
        load_config_string(text, HOST)
    except ConfigError:
        pass


@given(word=st.sampled_from(["yes", "no", "true", "false", "on", "off", "1", "0"]), data=st.data())
def test_boolean_words_parse_in_any_case(word, data):
    mixed = "".join(data.draw(st.sampled_from([c.lower(), c.upper()])) for c in word)
    assert Boolean().parse(mixed) is (word in ("yes", "true", "on", "1"))


@given(n=st.integers(min_value=-10**12, max_value=10**12))
def test_integers_round_trip_and_respect_bounds(n):
    kind = Integer(min=0, max=10**9)
    if 0 <= n <= 10**9:
        assert kind.parse(str(n)) == n
    else:
        try:
            kind.parse(str(n))
        except ValueError as error:
            assert "must be" in str(error)
        else:
            raise AssertionError(f"{n} accepted")


@given(x=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6))
def test_numbers_round_trip(x):
    assert Number().parse(repr(x)) == x


# Lines that exercise configparser's corners: indentation, comments, empty names, odd headers.
_LINES = st.one_of(
    st.sampled_from(["[settings]", "[machinetype a]", "  [x]", "", "   ", "# c", "; c", "  # indented",
                     "a = 1", "A = 2", "  b = 3", "\tc: 4", "d=", "= e", "junk", "  cont", "[]", "[a]]"]),
    st.text(alphabet="ab =:[]#; \t\x0b\x85", max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINES, max_size=12))
def test_line_scan_finds_every_section_and_option_configparser_finds(lines):
    """The loader's line numbers come from its own scan; it must agree with configparser."""
    import configparser

    from vacfactory.config.sections import DEFAULT_SECTION, scan_lines

    text = "\n".join(lines)
    parser = configparser.RawConfigParser(strict=False, interpolation=None, empty_lines_in_values=False,
                                          default_section=DEFAULT_SECTION)
    try:
        parser.read_string(text)
    except configparser.MissingSectionHeaderError:
        return
    except configparser.ParsingError:
        pass
    headers, options = scan_lines(text)
    assert set(headers) == set(parser.sections())
    assert set(options) == {(s, n) for s in parser.sections() for n, _ in parser.items(s, raw=True)}


def test_huge_integer_is_an_error_not_a_crash():
    try:
        Integer().parse("9" * 5000)
    except ValueError as error:
        assert "too large" in str(error)
    else:
        raise AssertionError("accepted")


# ---- the same for a Vac site's files, read as Vac reads them


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(SETTINGS_NAMES + ["DEFAULT"]), value=VALUES, mt=st.sampled_from(MT_NAMES))
def test_any_vac_value_fails_only_with_config_error(name, value, mt):
    text = (f"[settings]\nvac_space = vac01.example.com\n{name} = {value}\n[DEFAULT]\n{mt} = {value}\n"
            f"[machinetype M]\ntarget_share = 1\n{mt} = {value}\n")
    try:
        config = load_config_string(text, HOST, source="/etc/vac.conf", vac=True)
    except ConfigError:
        return
    for machinetype in config.machinetypes.values():  # what loads is usable: never half-read
        assert isinstance(machinetype.startable, bool)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("[]=:;# \t\nabcDEFAULT_sxt0-\r\"rem"), max_size=200))
def test_any_vac_file_content_fails_only_with_config_error(text):
    try:
        load_config_string(text, HOST, source="/etc/vac.conf", vac=True)
    except ConfigError:
        pass
