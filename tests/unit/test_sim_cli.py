"""``vacfactory simulate --workload FILE``: a site's configuration against a workload, Vac's
policy, the configuration's and both options on, side by side; bad input is one clear line."""

from __future__ import annotations

import json

from vacfactory.cli.main import main

CONFIG = """[settings]
vac_space = space.example.ac.uk
factory_name = here.example.ac.uk
factories = a.example.ac.uk b.example.ac.uk c.example.ac.uk
total_processors = 4
domain_type = test
{extra}
[machinetype atlas]
target_share = 3
root_image = /tmp/none.img
max_wallclock_seconds = 36000

[machinetype lhcb]
target_share = 1
root_image = /tmp/none.img
max_wallclock_seconds = 36000
"""

WORKLOAD = {"hours": 20, "warmup_hours": 4,
            "machinetypes": {"lhcb": {"supply": "bursty", "on_hours": 3, "off_hours": 3,
                                      "mean_hours": 3},
                             "atlas": {"mean_hours": 3}},
            "share_change": {"at_hours": 12, "shares": {"atlas": 1, "lhcb": 3}}}


def files(tmp_path, extra="", workload=None):
    config = tmp_path / "vacfactory.conf"
    config.write_text(CONFIG.format(extra=extra))
    path = tmp_path / "w.json"
    path.write_text(json.dumps(WORKLOAD if workload is None else workload))
    return str(config), str(path)


def test_simulate_workload_prints_three_policies_side_by_side(tmp_path, capsys):
    config, workload = files(tmp_path)
    assert main(["-c", config, "simulate", "--workload", workload, "--processors", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("3 factories x 4 processors")
    assert "Vac 03.01" in out[1] and "this configuration" in out[1]
    assert "+ adaptive_backoff + rebalance" in out[1]
    rows = {line[:28].strip() for line in out[2:]}
    assert {"occupancy %", "waste processor-h", "share error lhcb", "convergence h",
            "payloads killed"} <= rows


def test_simulate_workload_json_and_a_configuration_with_the_options_on(tmp_path, capsys):
    config, workload = files(tmp_path, "adaptive_backoff = yes\nrebalance = yes\n")
    assert main(["-c", config, "simulate", "--workload", workload, "--factories", "2",
                 "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in runs] == ["Vac 03.01", "this configuration"]
    assert runs[1]["payloads_killed"] == 0 and runs[1]["notices"] >= 0


def test_simulate_workload_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    config, workload = files(tmp_path, workload={"machinetypes": {"cms": {}}})
    assert main(["-c", config, "simulate", "--workload", workload]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "machinetypes.cms: not a configured machinetype" in err[0]
    assert main(["-c", config, "simulate", "--workload", str(tmp_path / "missing.json")]) == 66
    assert "cannot read the workload file" in capsys.readouterr().err
