"""##user_data_...## substitution: Vac's table, options, files, cleanup, single pass."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vacfactory.core.userdata import (
    LEFTOVER,
    render_user_data,
    standard_substitutions,
    substitution_table,
    token,
)


def table(**overrides):
    values = dict(
        space="vac01.example.org", machinetype="lhcb", machine_hostname="host-01.example.org",
        manager_version="vacfactory 0.1.0", manager_hostname="factory.example.org",
        uuid="0b5c6f9e-1111-2222-3333-444455556666",
        machinefeatures_url="http://169.254.169.253/machinefeatures",
        jobfeatures_url="http://169.254.169.253/jobfeatures",
        joboutputs_url="http://169.254.169.253/joboutputs",
    )
    values.update(overrides)
    return standard_substitutions(**values)


def test_standard_table_has_every_vac_pattern_with_its_value() -> None:
    t = table()
    assert t == {
        "##user_data_space##": "vac01.example.org",
        "##user_data_machinetype##": "lhcb",
        "##user_data_machine_hostname##": "host-01.example.org",
        "##user_data_manager_version##": "vacfactory 0.1.0",
        "##user_data_manager_hostname##": "factory.example.org",
        "##user_data_uuid##": "0b5c6f9e-1111-2222-3333-444455556666",
        "##user_data_machinefeatures_url##": "http://169.254.169.253/machinefeatures",
        "##user_data_jobfeatures_url##": "http://169.254.169.253/jobfeatures",
        "##user_data_joboutputs_url##": "http://169.254.169.253/joboutputs",
        "##user_data_vmtype##": "lhcb",
        "##user_data_vm_hostname##": "host-01.example.org",
        "##user_data_vmlm_version##": "vacfactory 0.1.0",
        "##user_data_vmlm_hostname##": "factory.example.org",
    }


def test_uuid_is_filled_unlike_vac() -> None:
    out = render_user_data("id=##user_data_uuid##", table())
    assert out == "id=0b5c6f9e-1111-2222-3333-444455556666"


def test_optional_urls_and_site_only_when_given() -> None:
    template = "[##user_data_root_image_url##][##user_data_url##][##user_data_site##]"
    assert render_user_data(template, table()) == "[][][]"
    t = table(root_image_url="https://images/x.img", user_data_url="https://ud/t", site="UKI-X")
    assert render_user_data(template, t) == "[https://images/x.img][https://ud/t][UKI-X]"


def test_extra_entries_accept_every_name_form() -> None:
    t = table(extra={"heartbeat_machines_url": "a", "user_data_b": "b", "##user_data_c##": "c"})
    assert (t["##user_data_heartbeat_machines_url##"], t["##user_data_b##"],
            t["##user_data_c##"]) == ("a", "b", "c")


@pytest.mark.parametrize("bad", ["has space", "##user_data_x", "other_x##y", "a/b", "##x##"])
def test_bad_substitution_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        token(bad)


def test_options_and_files_replace_their_patterns() -> None:
    template = ("a=##user_data_option_a## b=##user_data_option_b## "
                "f=##user_data_file_f## fo=##user_data_option_f##")
    out = render_user_data(template, table(), options={"a": "1", "user_data_option_b": "2"},
                           files={"user_data_file_f": "FILE\n"})
    assert out == "a=1 b=2 f=FILE\n fo=FILE\n"


def test_precedence_is_substitutions_then_options_then_files() -> None:
    template = "##user_data_option_x## ##user_data_space##"
    out = render_user_data(template, {"space": "S", "user_data_option_x": "fixed"},
                           options={"x": "option", "space": "ignored"}, files={"x": "file"})
    assert out == "fixed S"
    assert render_user_data("##user_data_option_x##", {}, options={"x": "option"},
                            files={"x": "file"}) == "option"


def test_proxy_goes_in_as_the_x509_proxy_option() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    out = render_user_data("write_files:\n  content: |\n##user_data_option_x509_proxy##", table(),
                           options={"x509_proxy": pem})
    assert out.endswith(pem)


def test_leftovers_are_removed_like_vac_and_other_text_is_kept() -> None:
    template = ("keep ##not_user_data## ##user_data_unknown## ##user_data_a,b## "
                "##user_data_Upper## #user_data_single# ####user_data_space####")
    out = render_user_data(template, table())
    assert out == "keep ##not_user_data##   ##user_data_Upper## #user_data_single# ##vac01.example.org##"


def test_substitution_is_single_pass() -> None:
    """A value that looks like a pattern is inserted verbatim, never expanded again."""
    t = table(machine_hostname="##user_data_option_secret##")
    out = render_user_data("host=##user_data_machine_hostname## ##user_data_option_evil##", t,
                           options={"secret": "TOPSECRET", "evil": "##user_data_uuid##"})
    assert out == "host=##user_data_option_secret## ##user_data_uuid##"
    assert "TOPSECRET" not in out


def test_output_does_not_depend_on_mapping_order() -> None:
    template = "##user_data_option_a####user_data_option_b####user_data_file_c####user_data_option_c##"
    options = {"a": "1", "b": "2", "c": "opt"}
    files = {"c": "file", "a": "fa"}
    outputs = set()
    rng = random.Random(7)
    for _ in range(20):
        o = list(options.items())
        f = list(files.items())
        rng.shuffle(o)
        rng.shuffle(f)
        outputs.add(render_user_data(template, table(), dict(o), dict(f)))
    assert outputs == {"12fileopt"}


def test_a_realistic_vac_template() -> None:
    template = """#cloud-config
# ##user_data_manager_version## on ##user_data_manager_hostname##
write_files:
 - path: /etc/vac
   content: |
     space=##user_data_space##
     type=##user_data_vmtype## host=##user_data_vm_hostname##
     mjf=##user_data_machinefeatures_url## ##user_data_jobfeatures_url##
     out=##user_data_joboutputs_url##
     vo=##user_data_option_vo## ##user_data_option_unset##
"""
    out = render_user_data(template, table(), options={"vo": "lhcb"})
    assert "space=vac01.example.org" in out
    assert "type=lhcb host=host-01.example.org" in out
    assert "mjf=http://169.254.169.253/machinefeatures http://169.254.169.253/jobfeatures" in out
    assert "vo=lhcb \n" in out
    assert "# vacfactory 0.1.0 on factory.example.org" in out
    assert "##" not in out


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=12)
_text = st.text(alphabet=st.characters(blacklist_characters="#"), max_size=30)


@given(st.lists(st.one_of(_text, _names.map(lambda n: f"##user_data_{n}##"),
                          _names.map(lambda n: f"##user_data_option_{n}##")), max_size=20),
       st.dictionaries(_names, _text, max_size=8))
def test_no_lowercase_pattern_survives_and_values_are_verbatim(parts, options) -> None:
    template = "".join(parts)
    out = render_user_data(template, table(), options=options)
    assert LEFTOVER.search(out) is None
    for name, value in options.items():
        if f"##user_data_option_{name}##" in template:
            assert value in out


@given(st.dictionaries(_names, st.text(max_size=20), max_size=5),
       st.dictionaries(_names, st.text(max_size=20), max_size=5))
def test_table_tokens_are_all_well_formed(options, files) -> None:
    merged = substitution_table(table(), options, files)
    assert all(re.fullmatch(r"##user_data_[A-Za-z0-9_,.-]+##", k) for k in merged)
