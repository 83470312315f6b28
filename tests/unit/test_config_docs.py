"""The generated reference: committed docs match the table, and every option is in them."""

from __future__ import annotations

import os

import pytest

from vacfactory.config import docs
from vacfactory.config import options as table

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_committed_configuration_md_equals_generated_output():
    with open(os.path.join(REPO, "docs", "configuration.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == docs.markdown(), (
        "docs/configuration.md is stale: run `python -m vacfactory.config.docs markdown > docs/configuration.md`")


def test_committed_man_page_equals_generated_output():
    with open(os.path.join(REPO, "docs", "vacfactory.conf.5"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == docs.man(), (
        "docs/vacfactory.conf.5 is stale: run `python -m vacfactory.config.docs man > docs/vacfactory.conf.5`")


@pytest.mark.parametrize("render", [docs.markdown, docs.man], ids=["markdown", "man"])
def test_every_option_alias_family_and_ignored_name_is_documented(render):
    text = render().replace("\\-", "-").replace("\\e", "\\").replace("\\fI", "").replace("\\fR", "")
    names = [o.name for o in table.OPTIONS] + [a for o in table.OPTIONS for a in o.aliases]
    names += [f.prefix + "XXX" for f in table.FAMILIES] + [i.name for i in table.IGNORED]
    missing = [n for n in names if n not in text]
    assert missing == []


def test_markdown_has_one_heading_per_option_row():
    headings = [line for line in docs.markdown().splitlines() if line.startswith("### `")]
    assert len(headings) == len(table.OPTIONS)


def test_markdown_shows_defaults_types_and_vac_flag():
    text = docs.markdown()
    assert "### `total_processors`\n\ntype: integer; default: this host's processor count (/proc/cpuinfo); " \
           "values: &gt;= 1; deprecated names: cpu_total; Vac: yes" in text
    assert "### `libvirt_uri`\n\ntype: string; default: qemu:///system; Vac: no (vacfactory only)" in text


def test_man_page_is_troff_with_a_title_and_escaped_hyphens():
    text = docs.man()
    assert text.startswith('.\\" Generated') and "\n.TH VACFACTORY.CONF 5 " in text
    assert "\n.B max\\_" not in text and "\n.B vacmon_hostport\n" in text
    body = [line for line in text.splitlines() if not line.startswith((".", "'"))]
    assert not any(line.lstrip().startswith(".") for line in body)
    assert "host\\-passthrough" in text


@pytest.mark.parametrize("fmt,render", [("markdown", docs.markdown), ("man", docs.man)])
def test_module_main_prints_the_requested_format(capsys, fmt, render):
    assert docs.main([fmt]) == 0
    assert capsys.readouterr().out == render()
