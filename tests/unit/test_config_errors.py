"""Broken configurations: each one is rejected with a message naming file, line, section, option."""

from __future__ import annotations

import os
import textwrap

import pytest

from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, check_config, load_config
from vacfactory.core import apel, mjf
from vacfactory.errors import ConfigError, ConfigErrors

HOST = HostFacts(fqdn="wn01.example.com", cpu_count=8, mem_total_mb=16384)

#: every machinefeatures key vacfactory writes itself (an extra of that name would replace it)
MACHINE_KEYS = mjf.MACHINEFEATURES_KEYS + mjf.LEGACY_MACHINEFEATURES_KEYS

# Lines 1-4 of every case; the case's own text starts at line 5.
HEAD = """\
[settings]
vac_space = vac01.example.com
factory_name = wn01.example.com
state_dir = {state}
"""

# A machinetype that is valid on its own (lines 5-7 when placed first).
MT = """\
[machinetype lhcb]
root_image = cernvm3.iso
target_share = 1
"""

CASES = [
    ("non-numeric integer", "total_processors = abc\n",
     "{main}:5: [settings] total_processors: 'abc' is not an integer"),
    ("negative where forbidden", "mb_per_processor = -1\n",
     "{main}:5: [settings] mb_per_processor: must be >= 1 (got -1)"),
    ("zero where forbidden", "max_starting_processors = 0\n",
     "{main}:5: [settings] max_starting_processors: must be >= 1 (got 0)"),
    ("fraction for an integer", MT + "max_processors = 1.5\n",
     "{main}:8: [machinetype lhcb] max_processors: '1.5' is not an integer"),
    ("nan for a number", "udp_timeout_seconds = nan\n",
     "{main}:5: [settings] udp_timeout_seconds: 'nan' is not a number"),
    ("number below its minimum", "cycle_seconds = 0.05\n",
     "{main}:5: [settings] cycle_seconds: must be >= 0.1 (got 0.05)"),
    ("port out of range", "http_port = 70000\n",
     "{main}:5: [settings] http_port: must be <= 65535 (got 70000)"),
    ("bad boolean in settings", "draining = maybe\n",
     "{main}:5: [settings] draining: 'maybe' is not a boolean"),
    ("bad boolean in machinetype", MT + "user_data_proxy = sometimes\n",
     "{main}:8: [machinetype lhcb] user_data_proxy: 'sometimes' is not a boolean"),
    ("unknown machine_model", MT + "machine_model = cernvm5\n",
     "{main}:8: [machinetype lhcb] machine_model: 'cernvm5' is not one of cernvm3, cernvm4, vm-raw"),
    ("unknown choice", "nfs_exporter = nfsd\n",
     "{main}:5: [settings] nfs_exporter: 'nfsd' is not one of none, ganesha, exportfs"),
    ("upper-case machinetype name", "[machinetype LHCb]\nroot_image = x.iso\n",
     "{main}:5: [machinetype LHCb] machinetype name 'LHCb' must match [a-z0-9-]+"),
    ("underscore in machinetype name", "[machinetype lhcb_prod]\nroot_image = x.iso\n",
     "{main}:5: [machinetype lhcb_prod] machinetype name 'lhcb_prod' must match [a-z0-9-]+"),
    ("machinetype without a name", "[machinetype]\nroot_image = x.iso\n",
     "{main}:5: [machinetype] needs a name: [machinetype NAME]"),
    ("factory_name without a dot", "factory_name = wn01\n",
     "{main}:5: [settings] factory_name: 'wn01' must be a fully qualified domain name"),
    ("max_processors below min_processors", MT + "min_processors = 4\nmax_processors = 2\n",
     "{main}:9: [machinetype lhcb] max_processors: must be >= min_processors (4)"),
    ("min_wallclock above max_wallclock", MT + "max_wallclock_seconds = 100\nmin_wallclock_seconds = 200\n",
     "{main}:9: [machinetype lhcb] min_wallclock_seconds: must be <= max_wallclock_seconds (100)"),
    ("[targetshares] section", "[targetshares]\nlhcb = 1\n",
     "{main}:5: [targetshares] use a target_share option in each [machinetype NAME] section"),
    ("[factories] section", "[factories]\nnames = wn02.example.com\n",
     "{main}:5: [factories] use the factories option in [settings] instead of a [factories] section"),
    ("bad vacmon_hostport", "vacmon_hostport = vacmon.example.com:8482 vacmon.example.com\n",
     "{main}:5: [settings] vacmon_hostport: 'vacmon.example.com' must be host.domain:port"),
    ("total_processors above the host's", "total_processors = 9\n",
     "{main}:5: [settings] total_processors: must be <= this host's 8 processors"),
    ("deprecated alias above the host's", "cpu_total = 9\n",
     "{main}:5: [settings] cpu_total: must be <= this host's 8 processors"),
    ("bad network_bridge", "network_bridge = bridge-name-too-long\n",
     "{main}:5: [settings] network_bridge: 'bridge-name-too-long' must be a Linux interface name"),
    ("space_key with space_key_file", "space_key = s3cret\nspace_key_file = /etc/vacfactory/key\n",
     "{main}:6: [settings] space_key_file: cannot be set together with space_key"),
    ("user_data_option with a bad suffix", "user_data_option_proxy-url = http://x\n",
     "{main}:5: [settings] user_data_option_proxy-url: the name after user_data_option_ must match [a-z0-9_]+"),
    ("user_data_file with an empty suffix", MT + "user_data_file_ = x\n",
     "{main}:8: [machinetype lhcb] user_data_file_: the name after user_data_file_ must match"),
    ("machinefeatures_option spanning two lines", "machinefeatures_option_db12 = 12.5\n    13.0\n",
     "{main}:5: [settings] machinefeatures_option_db12: must be a single line"),
    ("duplicate option in one section", "mb_per_processor = 1024\nmb_per_processor = 2048\n",
     "{main}:6: [settings] mb_per_processor: given twice in this section (first at line 5)"),
    ("alias and canonical name in one section", "cpu_total = 2\ntotal_processors = 4\n",
     "{main}:6: [settings] total_processors: also given as cpu_total at line 5"),
    ("a line that is not an option", "this is not an option\n",
     "{main}:5: cannot parse this line (expected 'name = value' or '[section]'): 'this is not an option'"),
    ("unknown option with a suggestion", MT + "max_wallclock_secs = 3600\n",
     "{main}:8: [machinetype lhcb] max_wallclock_secs: unknown option (did you mean max_wallclock_seconds?)"),
    ("machinetype option in [settings]", "fizzle_seconds = 60\n",
     "{main}:5: [settings] fizzle_seconds: unknown option here: fizzle_seconds belongs in [machinetype NAME]"),
    ("unknown section with a suggestion", "[machintype atlas]\nroot_image = x.iso\n",
     "{main}:5: [machintype atlas] unknown section: expected one of [settings]"),
    ("empty state_dir", "[settings]\nstate_dir =\n",
     "{main}:6: [settings] state_dir: must not be empty"),
    ("control character in kernel_cmdline", MT + "kernel_image = vmlinuz\nkernel_cmdline = quiet\tconsole=ttyS0\n",
     "{main}:9: [machinetype lhcb] kernel_cmdline: must not contain control characters"),
    ("initrd without kernel", MT + "initrd_image = initrd.img\n",
     "{main}:5: [machinetype lhcb] kernel_image: initrd_image need kernel_image"),
    ("docker image for a VM model", "[machinetype lhcb]\nroot_image = docker://lhcb/worker\n",
     "{main}:6: [machinetype lhcb] root_image: a docker:// image needs machine_model = docker"),
    ("machinetype without an image", "[machinetype lhcb]\ntarget_share = 1\n",
     "{main}:5: [machinetype lhcb] root_image: root_image (or kernel_image) is required"),
    ("URL scheme not allowed", MT + "user_data = ftp://example.com/user_data\n",
     "{main}:8: [machinetype lhcb] user_data: 'ftp://example.com/user_data': URL scheme must be one of http, https"),
    ("invalid regular expression", MT + "image_signing_dn = /DC=ch/(unclosed\n",
     "{main}:8: [machinetype lhcb] image_signing_dn: '/DC=ch/(unclosed' is not a valid regular expression"),
    ("heartbeat_file with a slash", MT + "heartbeat_file = ../heartbeat\n",
     "{main}:8: [machinetype lhcb] heartbeat_file: '../heartbeat' must be a plain file name"),
    ("apel_send without a broker", "apel_send = yes\n",
     "{main}:5: [settings] apel_send: apel_broker_host (or apel_sender_cfg) is required when apel_send = yes"),
    ("vacuum pipe without a URL", "[vacuum_pipe example]\ntarget_share = 1\n",
     "{main}:5: [vacuum_pipe example] vacuum_pipe_url: required option is missing"),
    ("vacuum pipe with a bad prefix", "[vacuum_pipe Example]\nvacuum_pipe_url = https://x.example.com/p.json\n",
     "{main}:5: [vacuum_pipe Example] vacuum pipe prefix 'Example' must match [a-z0-9-]+"),
    ("vacuum pipe with a bad machinetype value",
     "[vacuum_pipe example]\nvacuum_pipe_url = https://x.example.com/p.json\nmax_processors = many\n",
     "{main}:7: [vacuum_pipe example] max_processors: 'many' is not an integer"),
    ("[settings] with a name", "[settings extra]\ndraining = yes\n",
     "{main}:5: [settings extra] [settings] takes no name"),
    ("accounting_fqan without a leading slash", MT + "accounting_fqan = lhcb/Role=NULL/Capability=NULL\n",
     "{main}:8: [machinetype lhcb] accounting_fqan: 'lhcb/Role=NULL/Capability=NULL' does not start with '/': "
     "APEL refuses such a record"),
    ("accounting_fqan that is not ASCII", MT + "accounting_fqan = /lhcb/R\u00f4le=NULL\n",
     "{main}:8: [machinetype lhcb] accounting_fqan: '/lhcb/R\u00f4le=NULL' is not printable ASCII"),
    ("machinefeatures_option naming a standard key", "machinefeatures_option_total_cpu = 64\n",
     "{main}:5: [settings] machinefeatures_option_total_cpu: 'total_cpu' is a standard or legacy "
     "machinefeatures key, which vacfactory writes itself: choose another name"),
    ("machinefeatures_option naming a legacy key", "machinefeatures_option_jobslots = 2\n",
     "{main}:5: [settings] machinefeatures_option_jobslots: 'jobslots' is a standard or legacy"),
    ("NFS MJF without an NFS exporter", "nfs_exporter = none\n" + MT + "mjf_transport = nfs\n",
     "{main}:9: [machinetype lhcb] mjf_transport: nfs needs NFS exports, but nfs_exporter = none in [settings]: "
     "set nfs_exporter = ganesha or exportfs, or use mjf_transport = http"),
]


def _write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _errors(tmp_path, text: str, host: HostFacts = HOST) -> list:
    state = str(tmp_path / "state")
    main = _write(str(tmp_path / "vacfactory.conf"), HEAD.format(state=state) + text)
    with pytest.raises(ConfigErrors) as caught:
        load_config(ConfigSources.for_main_file(main), host_facts=host)
    return [str(e) for e in caught.value.errors]


@pytest.mark.parametrize("text,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_configuration_is_rejected_with_located_message(tmp_path, text, expected):
    main = str(tmp_path / "vacfactory.conf")
    messages = _errors(tmp_path, text)
    wanted = expected.format(main=main)
    assert any(m.startswith(wanted) for m in messages), "\n".join(messages)


def test_there_are_at_least_25_broken_configurations():
    assert len(CASES) >= 25


def test_missing_vac_space_is_reported_at_the_settings_header(tmp_path):
    main = _write(str(tmp_path / "vacfactory.conf"),
                  f"# comment\n[settings]\nfactory_name = wn01.example.com\nstate_dir = {tmp_path}\n")
    with pytest.raises(ConfigErrors) as caught:
        load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert [str(e) for e in caught.value.errors] == [f"{main}:2: [settings] vac_space: required option is missing"]


def test_every_problem_in_a_file_is_reported_not_just_the_first(tmp_path):
    text = "total_processors = abc\ndraining = maybe\n" + MT + "max_wallclock_secs = 1\nmachine_model = x\n"
    main = str(tmp_path / "vacfactory.conf")
    messages = _errors(tmp_path, text)
    assert [m.split(": [")[0] for m in messages] == [f"{main}:5", f"{main}:6", f"{main}:10", f"{main}:11"]


def test_problems_in_several_files_are_all_reported_in_reading_order(tmp_path):
    state = tmp_path / "state"
    dropin = _write(str(tmp_path / "vacfactory.d" / "10-a.conf"), "[settings]\ndraining = perhaps\n")
    main = _write(str(tmp_path / "vacfactory.conf"),
                  HEAD.format(state=state) + "total_processors = lots\n")
    with pytest.raises(ConfigErrors) as caught:
        load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert [str(e).split(": [")[0] for e in caught.value.errors] == [f"{dropin}:2", f"{main}:5"]


def test_override_file_may_not_set_state_dir(tmp_path):
    state = tmp_path / "state"
    override = _write(str(state / "runtime.conf"), "[settings]\ndraining = yes\nstate_dir = /elsewhere\n")
    main = _write(str(tmp_path / "vacfactory.conf"), HEAD.format(state=state))
    with pytest.raises(ConfigErrors) as caught:
        load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert [str(e) for e in caught.value.errors] == [
        f"{override}:3: [settings] state_dir: cannot be set in the runtime override file"
    ]


def test_option_before_any_section_is_reported_with_its_line(tmp_path):
    main = _write(str(tmp_path / "vacfactory.conf"), "\n# start\nvac_space = x.example.com\n[settings]\n")
    with pytest.raises(ConfigErrors) as caught:
        load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert str(caught.value.errors[0]).startswith(f"{main}:3: this line comes before any [section] header")


def test_missing_main_file_is_an_error_naming_it(tmp_path):
    main = str(tmp_path / "absent.conf")
    with pytest.raises(ConfigErrors) as caught:
        load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert str(caught.value) == f"{main}: cannot read: No such file or directory"


def test_file_that_is_not_utf8_is_an_error(tmp_path):
    main = tmp_path / "vacfactory.conf"
    main.write_bytes(b"[settings]\nvac_space = \xff\xfe\n")
    with pytest.raises(ConfigErrors) as caught:
        load_config(ConfigSources.for_main_file(str(main)), host_facts=HOST)
    assert "is not valid UTF-8 text" in str(caught.value)


def test_unusable_computed_default_says_which_option_to_set(tmp_path):
    host = HostFacts(fqdn="localhost", cpu_count=2, mem_total_mb=0)
    main = _write(str(tmp_path / "vacfactory.conf"), f"[settings]\nvac_space = v.example.com\nstate_dir = {tmp_path}\n")
    with pytest.raises(ConfigErrors) as caught:
        load_config(ConfigSources.for_main_file(main), host_facts=host)
    messages = [str(e) for e in caught.value.errors]
    assert f"{main}:1: [settings] factory_name: the default (this host's name (os.uname().nodename): 'localhost') " \
           "is not usable: 'localhost' must be a fully qualified domain name (contain a dot); set factory_name" in messages
    # an unreadable MemTotal is no error: total_memory_mb is unset (no cap) unless the admin sets it
    assert not any("total_memory_mb" in m for m in messages)


def test_load_errors_can_be_caught_as_one_config_error(tmp_path):
    main = _write(str(tmp_path / "vacfactory.conf"), HEAD.format(state=tmp_path) + "draining = maybe\n")
    with pytest.raises(ConfigError) as caught:
        load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert isinstance(caught.value, ConfigErrors) and len(caught.value.errors) == 1


def test_check_config_returns_warnings_even_when_there_are_errors(tmp_path):
    main = _write(str(tmp_path / "vacfactory.conf"),
                  HEAD.format(state=tmp_path) + "mb_per_cpu = 1024\ndraining = maybe\n")
    result = check_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert not result.ok and result.config is None
    assert result.warnings == (f"{main}:5: [settings] mb_per_cpu: deprecated: use mb_per_processor",)
    assert [str(e).split(":")[1] for e in result.errors] == ["6"]


def test_error_message_does_not_echo_a_secret_value(tmp_path):
    messages = _errors(tmp_path, "space_key = top\x01secret\n")
    assert messages == [f"{tmp_path / 'vacfactory.conf'}:5: [settings] space_key: must not contain control characters"]
    assert "secret" not in messages[0].split("space_key:")[1]


@pytest.mark.parametrize("name", ["user_data_option_x", "machinefeatures_option_y"])
def test_family_names_are_checked_after_lowercasing(tmp_path, name):
    config_text = textwrap.dedent(f"""\
        {name.upper()} = value
        """)
    # configparser lowercases option names, so upper-case suffixes are accepted as lower-case ones
    state = tmp_path / "state"
    main = _write(str(tmp_path / "vacfactory.conf"), HEAD.format(state=state) + config_text)
    config = load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    family = "user_data_options" if name.startswith("user") else "machinefeatures_options"
    assert dict(getattr(config.settings, family)) == {name.split("_option_")[1]: "value"}


@pytest.mark.parametrize("key", MACHINE_KEYS)
def test_every_machinefeatures_key_vacfactory_writes_is_refused_as_an_extra(tmp_path, key):
    main = str(tmp_path / "vacfactory.conf")
    messages = _errors(tmp_path, f"machinefeatures_option_{key} = 1\n")
    assert messages == [f"{main}:5: [settings] machinefeatures_option_{key}: {key!r} is a standard or legacy "
                        "machinefeatures key, which vacfactory writes itself: choose another name"]


def test_machinefeatures_extras_the_configuration_accepts_are_accepted_by_mjf(tmp_path):
    # the configuration refuses exactly what core.mjf would refuse at VM creation
    main = _write(str(tmp_path / "vacfactory.conf"), HEAD.format(state=tmp_path)
                  + "machinefeatures_option_db12 = 12.5\nmachinefeatures_option_hypervisor = hidden\n")
    config = load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    inputs = mjf.MJFInput(job_id="x", processors=1, jobstart=0, shutdown_time=1, mb_per_processor=1,
                          hs06_per_processor=None, extra_machinefeatures=config.settings.machinefeatures_options)
    assert mjf.machinefeatures(inputs)["db12"] == "12.5"
    with pytest.raises(ValueError, match="would override a standard key"):
        mjf.MJFInput(job_id="x", processors=1, jobstart=0, shutdown_time=1, mb_per_processor=1,
                     hs06_per_processor=None, extra_machinefeatures={"total_cpu": "1"})


def test_an_accounting_fqan_the_configuration_accepts_makes_a_valid_apel_record(tmp_path):
    main = _write(str(tmp_path / "vacfactory.conf"), HEAD.format(state=tmp_path) + MT
                  + "accounting_fqan = /lhcb/Role=NULL/Capability=NULL\n")
    mt = load_config(ConfigSources.for_main_file(main), host_facts=HOST).machinetypes["lhcb"]
    usage = apel.VMUsage(uuid="u1", machinetype="lhcb", hostname="wn01-00.example.com", processors=1,
                         start_time=1000, end_time=5000, cpu_seconds=3000, memory_mb=2048,
                         hs06_per_processor=10.0, accounting_fqan=mt.accounting_fqan)
    identity = apel.RecordIdentity(site="SITE", space="vac01.example.com", factory="wn01.example.com")
    text = apel.job_message(usage, identity, now=5000)
    assert "FQAN: /lhcb/Role=NULL/Capability=NULL\n" in text


def test_nfs_exporter_none_in_the_override_is_refused_at_the_nfs_machinetype(tmp_path):
    state = tmp_path / "state"
    _write(str(state / "runtime.conf"), "[settings]\nnfs_exporter = none\n")
    main = _write(str(tmp_path / "vacfactory.conf"), HEAD.format(state=state) + MT + "mjf_transport = nfs\n")
    with pytest.raises(ConfigErrors) as caught:
        load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert [str(e).split(": nfs needs")[0] for e in caught.value.errors] == \
        [f"{main}:8: [machinetype lhcb] mjf_transport"]


@pytest.mark.parametrize("settings,machinetype", [
    ("nfs_exporter = ganesha\n", "root_image = x.iso\nmjf_transport = nfs\n"),
    ("nfs_exporter = exportfs\n", "root_image = x.iso\nmjf_transport = nfs\n"),
    ("nfs_exporter = none\n", "root_image = x.iso\nmjf_transport = http\n"),
    # a container gets its MJF by bind mounts, so it never needs an export
    ("nfs_exporter = none\n", "machine_model = docker\nroot_image = docker://lhcb/worker\nmjf_transport = nfs\n"),
], ids=["ganesha", "exportfs", "http", "docker"])
def test_nfs_mjf_loads_whenever_exports_can_be_made_or_are_not_needed(tmp_path, settings, machinetype):
    main = _write(str(tmp_path / "vacfactory.conf"), HEAD.format(state=tmp_path) + settings
                  + "[machinetype lhcb]\n" + machinetype)
    config = load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert config.machinetypes["lhcb"].mjf_transport == machinetype.rsplit("= ", 1)[1].strip()
