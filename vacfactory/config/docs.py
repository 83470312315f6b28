"""Generate the configuration reference from the option table.

``python -m vacfactory.config.docs markdown`` prints docs/configuration.md and
``python -m vacfactory.config.docs man`` prints vacfactory.conf(5), and
``python -m vacfactory.config.docs migration`` the migration table of docs/admin-guide.md (how
a Vac site's files are read). All come from ``config/options.py`` only, and unit tests compare
the committed files with this output, so the reference cannot drift from what the loader accepts.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence, Tuple

from vacfactory.config import loader
from vacfactory.config import options as table
from vacfactory.config.parsers import FALSE_WORDS, TRUE_WORDS, Choice

SECTION_TITLES = {
    table.SETTINGS: "[settings]",
    table.MACHINETYPE: "[machinetype NAME]",
    table.VACUUM_PIPE: "[vacuum_pipe PREFIX]",
}

SECTION_INTROS = {
    table.SETTINGS: (
        "Factory-wide settings. Exactly one logical [settings] section: several [settings] "
        "headers, in one file or many, merge into it."
    ),
    table.MACHINETYPE: (
        "One section per kind of VM. NAME must match `[a-z0-9-]+`: no upper case and no `_` "
        "(Vac's rule; Vac separated fields of its file names with `_`). The legacy header "
        "`[vmtype NAME]` is accepted with a warning."
    ),
    table.VACUUM_PIPE: (
        "A vacuum pipe: a JSON document at vacuum_pipe_url defining machinetypes named "
        "PREFIX-SUFFIX. PREFIX must match `[a-z0-9-]+`. Besides the options below, the section "
        "accepts every [machinetype NAME] option (and the user_data_option_XXX and "
        "user_data_file_XXX families); they are validated when the file is loaded and become "
        "defaults of every machinetype the pipe defines, unless that machinetype's own section "
        "sets them."
    ),
}


def _files_text() -> List[str]:
    return [
        "Files are read in this order; a later file wins per option, and sections with the same "
        "name merge (as in Vac):",
        f"1. `{loader.DEFAULT_DROPIN_DIR}/*.conf`, sorted by name;",
        f"2. `{loader.DEFAULT_MAIN_FILE}`;",
        f"3. the runtime override `<state_dir>/{table.RUNTIME_OVERRIDE_NAME}`, for temporary changes "
        "such as draining or shutdown_time. state_dir is taken from the files before it, so the "
        "override may not set state_dir.",
        "With `vacfactory --config DIR/NAME.conf`, the drop-in directory is `DIR/NAME.d/`. A Vac "
        "configuration loads unchanged: with `--config /etc/vac.conf` the drop-ins are "
        f"`/etc/vac.d/*.conf`, and Vac's runtime file `{loader.VAC_RUNTIME_FILE}` is read after "
        "`/etc/vac.conf` and before the override; these files are read as Vac reads them (see "
        "\"Reading a Vac site's files\" below).",
        "The daemon re-reads the files when one appears, vanishes or changes. A broken edit is "
        "reported (every problem, with file and line) and the last good configuration stays in "
        "use; running VMs are never touched because of it. `vacfactory config check` reports the "
        "same messages and exits 78 when there are errors; `vacfactory config show` prints every "
        "option's effective value and where it came from.",
    ]


def _syntax_text() -> List[str]:
    return [
        "vacfactory's own files are read strictly. The syntax is Python's INI dialect (configparser): "
        "`[section]` headers, `name = value` "
        "or `name: value` lines, comments on lines starting with `#` or `;`, and values continued "
        "on following lines that are indented deeper than the option. Option names are "
        "case-insensitive. Every problem in every file is reported, each with file, line, section "
        "and option.",
        "Booleans accept " + ", ".join(f"{t}/{f}" for t, f in zip(TRUE_WORDS, FALSE_WORDS))
        + " in any case, for every boolean option (Vac took only some spellings for some options).",
        "Numbers are plain decimals (integers where an integer is required); `1_000`, `nan` and "
        "`inf` are refused. Lists are whitespace-separated.",
        "An unknown option in any section is an error, with a suggestion for likely typos. "
        "Deprecated option names (aliases) are accepted with a warning. Options Vac once had "
        "but no longer uses are ignored with a warning.",
        "Relative paths in root_image, user_data, kernel_image, initrd_image and "
        "user_data_file_XXX are resolved against `<machinetype_path>/files/`.",
    ]


def _vac_text() -> List[str]:
    return [
        f"A Vac site's files are read the way Vac 03.01's readConf() reads them: `{loader.VAC_MAIN_FILE}`, "
        f"`{loader.VAC_DROPIN_DIR}/*.conf`, `{loader.VAC_RUNTIME_FILE}` and any file named `vac.conf` "
        "given to --config (in code: `ConfigSources.for_main_file(path, vac=True)` reads any file "
        "so). The runtime override `<state_dir>/runtime.conf`, which vacfactory itself writes, is "
        "always read strictly.",
        "In a Vac file the syntax is Python 2 RawConfigParser's; what Vac does not read is ignored "
        "with one warning naming file and line; each option's value means what it meant to Vac; "
        "and machinetype files, the vacuum pipe caches and the image cache default to Vac's "
        f"places under `{table.VAC_STATE_DIR}`. Nothing Vac loads is refused. What Vac refuses "
        "(`int('600.0')`, no [settings], no vac_space, a line its parser cannot read, a "
        "machinetype name outside `[a-z0-9-]` after lower-casing, max_processors < min_processors, "
        "more total_processors than the host has) is refused here too, naming file and line. "
        "vacfactory's own options may be set in a Vac file and keep their meaning. Every "
        "difference between the two readings:",
    ]


def migration_rows() -> List[Tuple[str, str, str]]:
    """(written, read in a Vac file / in a vacfactory file, to say it in a vacfactory file)."""
    rows = [(d.written, f"{d.vac}. In a vacfactory file: {d.here}.", d.write) for d in table.VAC_SYNTAX]
    for option in table.OPTIONS:
        if option.vac_reading:
            rows.append((f"`{option.name}` in {SECTION_TITLES[option.section]}",
                         option.vac_reading[0].upper() + option.vac_reading[1:] + ".", option.vac_write))
    explained = {(o.section, o.name) for o in table.OPTIONS if o.vac_reading}
    for rule in table.RULES:
        if rule.vac_severity and (rule.section, rule.option) not in explained:
            rows.append((f"{SECTION_TITLES[rule.section]}: {rule.doc}",
                         f"A {rule.vac_severity}, and the configuration loads.", "what the rule asks"))
    return rows


def migration_markdown() -> str:
    """The migration table, as docs/admin-guide.md holds it between the generated markers."""
    out = ["| In a Vac file | is read as Vac reads it (and in a vacfactory file) | in a vacfactory file, write |",
           "|---|---|---|"]
    for written, meaning, write in migration_rows():
        out.append(f"| {_md_cell(written)} | {_md_cell(meaning)} | {_md_cell(write)} |")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return _md_inline(text).replace("|", "\\|")


def _meta(option: table.Option) -> List[Tuple[str, str]]:
    items = [("type", option.type.name), ("default", table.describe_default(option))]
    constraints = option.type.constraints()
    if constraints:
        items.append(("values", constraints))
    if option.aliases:
        items.append(("deprecated names", ", ".join(option.aliases)))
    if option.legacy_values:
        items.append(("legacy values", ", ".join(f"{t} (= {option.type.format(v)})" for t, v in option.legacy_values)))
    items.append(("Vac", "yes" if option.vac else "no (vacfactory only)"))
    if option.secret:
        items.append(("secret", "yes: never shown by `config show`"))
    if option.not_in_override:
        items.append(("runtime override", "not allowed"))
    if option.vac_reading:
        items.append(("in a Vac file", option.vac_reading))
    return items


def _rule_marker(rule: table.Rule) -> str:
    marks = ["warning"] if rule.severity == "warning" else []
    if rule.vac_severity and rule.vac_severity != rule.severity:
        marks.append(f"in a Vac configuration: a {rule.vac_severity}")
    return f" ({'; '.join(marks)})" if marks else ""


def _choice_docs(option: table.Option) -> List[Tuple[str, str]]:
    if isinstance(option.type, Choice):
        return list(option.type.choice_docs)
    return []


# --------------------------------------------------------------------------- Markdown


def markdown() -> str:
    out: List[str] = [
        "# vacfactory configuration reference",
        "",
        "<!-- Generated by `python -m vacfactory.config.docs markdown` from "
        "vacfactory/config/options.py. Do not edit: change the table and regenerate. -->",
        "",
        "## Files",
        "",
    ]
    files = _files_text()
    out += [_md_inline(files[0]), ""] + [_md_inline(f) for f in files[1:4]] + [""]
    for paragraph in files[4:]:
        out += [_md_inline(paragraph), ""]
    out += ["## Syntax", ""]
    for paragraph in _syntax_text():
        out += [_md_inline(paragraph), ""]
    out += ["## Reading a Vac site's files", ""]
    for paragraph in _vac_text():
        out += [_md_inline(paragraph), ""]
    out += [migration_markdown()]
    for section in table.SECTIONS:
        out += _markdown_section(section)
    out += ["## Rules between options", ""]
    for rule in table.RULES:
        out.append(f"- {SECTION_TITLES[rule.section]}{_rule_marker(rule)}: {_md_inline(rule.doc)}")
    out += ["", "## Forbidden sections", ""]
    for name, advice in table.FORBIDDEN_SECTIONS.items():
        out.append(f"- `[{name}]`: an error: {_md_inline(advice)}.")
    out.append("")
    return "\n".join(out)


def _markdown_section(section: str) -> List[str]:
    out = [f"## {SECTION_TITLES[section]}", "", _md_inline(SECTION_INTROS[section]), ""]
    for option in table.options_of(section):
        out += [f"### `{option.name}`", ""]
        out.append("; ".join(f"{k}: {_md_inline(v)}" for k, v in _meta(option)))
        out += ["", _md_inline(table.option_doc(option)), ""]
        for choice, text in _choice_docs(option):
            out.append(f"- `{choice}`: {_md_inline(text)}")
        if _choice_docs(option):
            out.append("")
    families = table.families_of(section)
    if families:
        out += ["### Option families", ""]
        for family in families:
            out += [f"#### `{family.prefix}XXX`", ""]
            constraints = family.type.constraints()
            meta = [("XXX", f"`{family.suffix_pattern}`"), ("type", family.type.name)]
            if constraints:
                meta.append(("values", constraints))
            meta.append(("Vac", "yes" if family.vac else "no (vacfactory only)"))
            out += ["; ".join(f"{k}: {_md_inline(v)}" for k, v in meta), "", _md_inline(family.doc), ""]
    ignored = [i for i in table.IGNORED if i.section == section]
    if ignored:
        out += ["### Ignored (with a warning)", ""]
        out += [f"- `{i.name}`: {_md_inline(i.reason)}" for i in ignored] + [""]
    return out


def _md_inline(text: str) -> str:
    """Escape '<' and '>' outside `code` spans, so <state_dir> is not taken for HTML."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


# --------------------------------------------------------------------------- man page


def _roff(text: str) -> str:
    """Escape text for troff: backslashes, hyphens, and control characters at line start."""
    text = text.replace("\\", "\\e").replace("-", "\\-").replace("`", "")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def man() -> str:
    out: List[str] = [
        '.\\" Generated by python -m vacfactory.config.docs man from vacfactory/config/options.py.',
        '.TH VACFACTORY.CONF 5 "" "vacfactory" "File Formats"',
        ".SH NAME",
        "vacfactory.conf \\- configuration of the vacfactory VM factory",
        ".SH SYNOPSIS",
        f"{_roff(loader.DEFAULT_DROPIN_DIR)}/*.conf, {_roff(loader.DEFAULT_MAIN_FILE)}, "
        f"<state_dir>/{table.RUNTIME_OVERRIDE_NAME}",
        ".SH FILES",
    ]
    files = _files_text()
    out += [_roff(files[0])]
    for item in files[1:4]:
        out += [".IP \\(bu 2", _roff(item.split(" ", 1)[1])]
    for paragraph in files[4:]:
        out += [".PP", _roff(paragraph)]
    out += [".SH SYNTAX"]
    for paragraph in _syntax_text():
        out += [".PP", _roff(paragraph)]
    out += [".SH VAC FILES"]
    for paragraph in _vac_text():
        out += [".PP", _roff(paragraph)]
    for written, meaning, write in migration_rows():
        out += [".IP \\(bu 2", _roff(f"{written}: {meaning} In a vacfactory file write: {write}.")]
    for section in table.SECTIONS:
        out += [f".SH {_roff(SECTION_TITLES[section].upper())}", _roff(SECTION_INTROS[section])]
        for option in table.options_of(section):
            out += [".TP", f".B {_roff(option.name)}"]
            out.append(_roff("; ".join(f"{k}: {v}" for k, v in _meta(option)) + "."))
            out += [".br", _roff(table.option_doc(option))]
            for choice, text in _choice_docs(option):
                out += [".br", _roff(f"{choice}: {text}")]
        for family in table.families_of(section):
            out += [".TP", f".B {_roff(family.prefix)}\\fIXXX\\fR",
                    _roff(f"XXX: {family.suffix_pattern}; type: {family.type.name}. {family.doc}")]
        for ignored in (i for i in table.IGNORED if i.section == section):
            out += [".TP", f".B {_roff(ignored.name)}", _roff(f"Ignored with a warning: {ignored.reason}.")]
    out += [".SH RULES BETWEEN OPTIONS"]
    for rule in table.RULES:
        out += [".IP \\(bu 2", _roff(f"{SECTION_TITLES[rule.section]}{_rule_marker(rule)}: {rule.doc}")]
    out += [".SH FORBIDDEN SECTIONS"]
    for name, advice in table.FORBIDDEN_SECTIONS.items():
        out += [".IP \\(bu 2", _roff(f"[{name}]: an error: {advice}.")]
    out += [".SH SEE ALSO", "vacfactory(8)", ""]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vacfactory.config.docs",
                                     description="Print the configuration reference generated from the option table.")
    parser.add_argument("format", choices=("markdown", "man", "migration"))
    args = parser.parse_args(argv)
    render = {"markdown": markdown, "man": man, "migration": migration_markdown}[args.format]
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
