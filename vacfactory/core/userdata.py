"""``##user_data_...##`` substitution in user_data templates (Vac's ``createUserData``, pure).

Fetching the template, reading ``user_data_file_XXX`` files and building the X.509 proxy are
I/O and happen in the adapters; this module only turns a template plus values into the text
the VM receives. Differences from Vac, on purpose:

- ``##user_data_uuid##`` is filled (Vac builds user_data before it knows the UUID, so it is
  always empty there).
- Substitution is a single pass over the template: a value that itself contains
  ``##user_data_...##`` (a site option, a file, a hostile hostname) is inserted verbatim and
  never expanded again. Vac's chain of ``str.replace`` calls could expand such text.
- The result does not depend on dict order: when two sources define the same pattern the
  precedence is fixed (standard substitutions, then options, then files), which is the order
  in which Vac's replacements would have consumed the pattern.

Leftover patterns matching Vac's cleanup expression ``##user_data_[a-z,0-9,_]*##`` are removed.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

#: what Vac removes when nothing replaced it (its character class includes a literal comma)
LEFTOVER = re.compile(r"##user_data_[a-z0-9_,]*##")
#: what we look up: Vac's class plus upper case, '-' and '.', which option names may contain
PATTERN = re.compile(r"##user_data_[A-Za-z0-9_,.-]*##")
_NAME = re.compile(r"[A-Za-z0-9_,.-]*")

OPTION_PREFIX = "user_data_option_"
FILE_PREFIX = "user_data_file_"


def token(name: str) -> str:
    """``user_data_xxx`` or ``xxx`` -> ``##user_data_xxx##``; already-full tokens unchanged."""
    if name.startswith("##") and name.endswith("##"):
        inner = name[2:-2]
    else:
        inner = name if name.startswith("user_data_") else "user_data_" + name
    if not inner.startswith("user_data_") or not _NAME.fullmatch(inner[len("user_data_"):]):
        raise ValueError(f"not a user_data substitution name: {name!r}")
    return f"##{inner}##"


def standard_substitutions(
    *,
    space: str,
    machinetype: str,
    machine_hostname: str,
    manager_version: str,
    manager_hostname: str,
    uuid: str,
    machinefeatures_url: str,
    jobfeatures_url: str,
    joboutputs_url: str,
    root_image_url: Optional[str] = None,
    user_data_url: Optional[str] = None,
    site: Optional[str] = None,
    extra: Mapping[str, str] = {},
) -> Dict[str, str]:
    """Vac's fixed substitution table, as ``{"##user_data_xxx##": value}``.

    ``manager_version`` is the full string Vac used (``"Vac 03.01"``; ours says
    ``"vacfactory <version>"``). ``root_image_url`` and ``user_data_url`` are given only when
    they are URLs (Vac substitutes them only then); ``site`` is ``gocdb_sitename`` if set.
    ``extra`` adds or overrides entries (e.g. ``heartbeat_machines_url``); its keys may be
    ``xxx``, ``user_data_xxx`` or ``##user_data_xxx##``.
    """
    table: Dict[str, str] = {
        "##user_data_space##": space,
        "##user_data_machinetype##": machinetype,
        "##user_data_machine_hostname##": machine_hostname,
        "##user_data_manager_version##": manager_version,
        "##user_data_manager_hostname##": manager_hostname,
        "##user_data_uuid##": uuid,
        "##user_data_machinefeatures_url##": machinefeatures_url,
        "##user_data_jobfeatures_url##": jobfeatures_url,
        "##user_data_joboutputs_url##": joboutputs_url,
        # deprecated vmtype/VM/VMLM names, still used by old templates
        "##user_data_vmtype##": machinetype,
        "##user_data_vm_hostname##": machine_hostname,
        "##user_data_vmlm_version##": manager_version,
        "##user_data_vmlm_hostname##": manager_hostname,
    }
    if root_image_url:
        table["##user_data_root_image_url##"] = root_image_url
    if user_data_url:
        table["##user_data_url##"] = user_data_url
    if site:
        table["##user_data_site##"] = site
    for name in sorted(extra):
        table[token(name)] = extra[name]
    return table


def _suffix(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


def substitution_table(
    substitutions: Mapping[str, str],
    options: Mapping[str, str],
    files: Mapping[str, str],
) -> Dict[str, str]:
    """Merge the three sources into one ``token -> value`` table with fixed precedence.

    ``options`` keys are ``XXX`` or ``user_data_option_XXX``; ``files`` keys are ``XXX`` or
    ``user_data_file_XXX`` and their values are the file contents, which replace both
    ``##user_data_file_XXX##`` and ``##user_data_option_XXX##`` (Vac). Precedence when a token
    is defined twice: ``substitutions`` > ``options`` > ``files``.
    """
    table: Dict[str, str] = {}
    for name in sorted(files):
        xxx = _suffix(name, FILE_PREFIX)
        table[token(FILE_PREFIX + xxx)] = files[name]
        table[token(OPTION_PREFIX + xxx)] = files[name]
    for name in sorted(options):
        table[token(OPTION_PREFIX + _suffix(name, OPTION_PREFIX))] = options[name]
    for name in sorted(substitutions):
        table[token(name)] = substitutions[name]
    return table


def render_user_data(
    template: str,
    substitutions: Mapping[str, str],
    options: Mapping[str, str] = {},
    files: Mapping[str, str] = {},
) -> str:
    """The user_data a VM receives: every known pattern replaced, leftovers removed, one pass.

    The X.509 proxy, when the machinetype asks for one, is passed as
    ``options["x509_proxy"]`` (it replaces ``##user_data_option_x509_proxy##``, as in Vac).
    """
    table = substitution_table(substitutions, options, files)

    def replace(match: "re.Match[str]") -> str:
        found = match.group(0)
        if found in table:
            return table[found]
        return "" if LEFTOVER.fullmatch(found) else found

    return PATTERN.sub(replace, template)
