"""`vacfactory config check` / `config show`: exit codes and messages."""

from __future__ import annotations

import json

from tests.unit.test_config_loading import write
from vacfactory.cli.common import EXIT_CONFIG, EXIT_OK, EXIT_USAGE
from vacfactory.cli.main import main


def good(tmp_path) -> str:
    """A configuration with nothing to predict (offline): its image exists, its share is 1, and
    on the test driver no qemu user needs to reach it (pytest's 0700 temp directory)."""
    write(tmp_path / "state" / "machinetypes" / "lhcb" / "files" / "cernvm3.iso", "an ISO image")
    return write(tmp_path / "vacfactory.conf", f"""\
[settings]
vac_space = vac01.example.com
factory_name = wn01.example.com
total_processors = 1
state_dir = {tmp_path / 'state'}
space_key = hunter2
mb_per_cpu = 1024
domain_type = test

[machinetype lhcb]
root_image = cernvm3.iso
target_share = 1
""")


def bad(tmp_path) -> str:
    return write(tmp_path / "vacfactory.conf", f"""\
[settings]
vac_space = vac01.example.com
factory_name = wn01
total_processors = 1
state_dir = {tmp_path}
draining = maybe
""")


def test_check_of_a_good_config_exits_0_with_a_summary(tmp_path, capsys):
    path = good(tmp_path)
    assert main(["--config", path, "config", "check", "--offline"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out == f"configuration OK: 1 machinetype (lhcb), 1 processor, state dir {tmp_path / 'state'}; " \
                  "1 warning; offline check\n"
    assert err == f"warning: {path}:7: [settings] mb_per_cpu: deprecated: use mb_per_processor\n"


def test_check_of_a_bad_config_exits_78_and_prints_every_error(tmp_path, capsys):
    path = bad(tmp_path)
    assert main(["--config", path, "config", "check"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:3: [settings] factory_name: 'wn01' must be a fully qualified domain name (contain a dot)",
        f"{path}:6: [settings] draining: 'maybe' is not a boolean (use yes/no, true/false, on/off or 1/0)",
        "configuration invalid: 2 errors",
    ]


def test_check_json_reports_ok_errors_warnings_and_machinetypes(tmp_path, capsys):
    assert main(["--config", good(tmp_path), "config", "check", "--json", "--offline"]) == EXIT_OK
    document = json.loads(capsys.readouterr().out)
    assert (document["ok"], document["errors"], document["machinetypes"]) == (True, [], ["lhcb"])
    assert len(document["warnings"]) == 1

    path = bad(tmp_path)
    assert main(["--config", path, "config", "check", "--json"]) == EXIT_CONFIG
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False and document["machinetypes"] == []
    assert document["errors"][1] == f"{path}:6: [settings] draining: 'maybe' is not a boolean " \
                                    "(use yes/no, true/false, on/off or 1/0)"


def test_show_prints_values_with_origins_and_masks_secrets(tmp_path, capsys):
    path = good(tmp_path)
    assert main(["--config", path, "config", "show"]) == EXIT_OK
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert f"#   {path}" in lines
    assert any(line.startswith("vac_space = vac01.example.com ") and line.endswith(f"; {path}:2") for line in lines)
    assert any(line.startswith("mb_per_processor = 1024 ") and line.endswith(f"; {path}:7") for line in lines)
    assert any(line.startswith("fizzle_seconds = 600 ") and line.endswith("; default") for line in lines)
    assert "[machinetype lhcb]" in lines
    assert "hunter2" not in out and any(line.startswith("space_key = ********") for line in lines)


def test_show_json_has_values_and_origins(tmp_path, capsys):
    path = good(tmp_path)
    assert main(["--config", path, "config", "show", "--json"]) == EXIT_OK
    document = json.loads(capsys.readouterr().out)
    lhcb = document["sections"]["machinetype lhcb"]
    assert lhcb["root_image"] == {"value": f"{tmp_path}/state/machinetypes/lhcb/files/cernvm3.iso",
                                  "origin": f"{path}:11"}
    assert document["sections"]["settings"]["space_key"]["value"] is None
    assert document["sections"]["settings"]["factories"] == {"value": [], "origin": "default"}


def test_show_of_a_bad_config_exits_78(tmp_path, capsys):
    assert _exit_code(["--config", bad(tmp_path), "config", "show"]) == EXIT_CONFIG
    assert "draining" in capsys.readouterr().err


def test_config_without_a_verb_prints_usage_and_exits_2(tmp_path, capsys):
    assert main(["--config", good(tmp_path), "config"]) == EXIT_USAGE
    assert "check" in capsys.readouterr().err


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code)
