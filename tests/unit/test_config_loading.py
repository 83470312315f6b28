"""Loading valid configurations: file order, merging, Vac compatibility, defaults, the model."""

from __future__ import annotations

import dataclasses
import os

import pytest

from vacfactory.config import options as table
from vacfactory.config.hostfacts import HostFacts, count_processors, memory_total_mb
from vacfactory.config.loader import ConfigSources, load_config, load_config_string
from vacfactory.config.model import MachineType, Settings, VacuumPipe, effective_options
from vacfactory.errors import ConfigError

HOST = HostFacts(fqdn="wn01.example.com", cpu_count=8, mem_total_mb=16384)


def write(path, text: str) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def minimal(state_dir, extra: str = "") -> str:
    return f"[settings]\nvac_space = vac01.example.com\nstate_dir = {state_dir}\n{extra}"


# A Vac 03.01 /etc/vac.conf as sites wrote it: legacy names, [vmtype], a vacuum pipe.
VAC_CONF = """\
# Vac configuration of wn01.example.com
[settings]
vac_space = vac01.example.com
factories = wn02.example.com wn03.example.com .
cpu_total = 8
mb_per_cpu = 3072
hs06_per_cpu = 10.5
overload_per_cpu = 1.5
disk_gb_per_cpu = 40
vcpu_per_machine = 2
domain_type = kvm
total_machines = 8
delete_old_files = yes
gocdb_sitename = UKI-NORTHGRID-MAN-HEP
vacmon_hostport = vacmon.gridpp.ac.uk:8482
version_logger = true
fix_networking = false
user_data_option_cvmfs_proxy = http://squid.example.com:3128
machinefeatures_option_db12 = 12.5

[machinetype lhcb]
target_share = 2
vm_model = cernvm3
root_image = https://lhcbproject.web.cern.ch/lhcbproject/cernvm3.iso
cernvm_signing_dn = /DC=ch/DC=cern/OU=computers/CN=cvm-sign01.cern.ch
user_data = https://lhcb-portal-dirac.cern.ch/pilot/user_data
user_data_option_cvmfs_proxy = http://lhcb-squid.example.com:3128
user_data_file_hostcert = hostcert.pem
accounting_fqan = /lhcb/Role=NULL/Capability=NULL
heartbeat_file = vm-heartbeat
heartbeat_seconds = 600
max_processors = 2
min_processors = 2
machineoutputs_days = 5
log_machineoutputs = true

[vmtype atlas]
target_share = 1
machine_model = vm-raw
root_image = /var/lib/vac/images/atlas.img
rootpublickey = /root/.ssh/id_rsa.pub
user_data_proxy = true
legacy_proxy = True

[vacuum_pipe gridpp]
vacuum_pipe_url = https://repo.gridpp.ac.uk/vacproject/gridpp/gridpp.pipe
target_share = 3
user_data_option_cvmfs_proxy = http://squid.example.com:3128
"""


def test_dropins_are_read_sorted_then_main_then_override_later_wins(tmp_path):
    state = tmp_path / "state"
    write(tmp_path / "vacfactory.d" / "20-b.conf", "[settings]\nmb_per_processor = 2000\nhttp_port = 8020\n")
    write(tmp_path / "vacfactory.d" / "10-a.conf",
          "[settings]\nmb_per_processor = 1000\nhttp_port = 8010\nudp_port = 9010\ncycle_seconds = 5\n")
    write(tmp_path / "vacfactory.d" / "30-c.conf.disabled", "[settings]\nmb_per_processor = 9999\n")
    main = write(tmp_path / "vacfactory.conf", minimal(state, "http_port = 8080\ncycle_seconds = 6\n"))
    write(state / "runtime.conf", "[settings]\ncycle_seconds = 7\ndraining = yes\n")
    config = load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    s = config.settings
    assert (s.mb_per_processor, s.udp_port, s.http_port, s.cycle_seconds, s.draining) == (2000, 9010, 8080, 7.0, True)
    assert [st.path for st in config.sources] == [
        str(tmp_path / "vacfactory.d" / "10-a.conf"), str(tmp_path / "vacfactory.d" / "20-b.conf"),
        main, str(state / "runtime.conf")]
    assert config.origins["settings"]["cycle_seconds"] == f"{state / 'runtime.conf'}:2"


def test_same_named_sections_merge_across_files(tmp_path):
    write(tmp_path / "vacfactory.d" / "lhcb.conf",
          "[machinetype lhcb]\ntarget_share = 1\nroot_image = cernvm3.iso\nmax_processors = 1\n")
    main = write(tmp_path / "vacfactory.conf",
                 minimal(tmp_path, "[machinetype lhcb]\nmax_processors = 4\n[machinetype atlas]\nroot_image = a.img\n"))
    config = load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    lhcb = config.machinetypes["lhcb"]
    assert (lhcb.target_share, lhcb.max_processors) == (1.0, 4)
    assert lhcb.root_image == str(tmp_path / "machinetypes" / "lhcb" / "files" / "cernvm3.iso")
    assert list(config.machinetypes) == ["lhcb", "atlas"]


def test_override_location_follows_state_dir_given_in_a_dropin(tmp_path):
    state = tmp_path / "elsewhere"
    write(tmp_path / "vacfactory.d" / "state.conf", f"[settings]\nstate_dir = {state}\n")
    main = write(tmp_path / "vacfactory.conf", "[settings]\nvac_space = vac01.example.com\n")
    write(state / "runtime.conf", "[settings]\nshutdown_time = 1700000000\n")
    config = load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert config.settings.shutdown_time == 1700000000
    assert config.settings.state_dir == str(state)


def test_option_and_section_kind_names_are_case_insensitive(tmp_path):
    main = write(tmp_path / "vacfactory.conf",
                 "[Settings]\nVAC_SPACE = vac01.example.com\nState_Dir = %s\nTotal_Processors = 3\n" % tmp_path)
    config = load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert config.settings.total_processors == 3


def test_vac_conf_layout_loads_unchanged_with_deprecation_warnings(tmp_path):
    etc = tmp_path / "etc"
    write(etc / "vac.d" / "shares.conf", "[machinetype lhcb]\ntarget_share = 5\n")
    main = write(etc / "vac.conf", VAC_CONF)
    runtime = write(tmp_path / "run" / "vac.conf", "[settings]\ndraining = yes\nstate_dir = %s\n" % (tmp_path / "s"))
    host = HostFacts(fqdn="wn01.example.com", cpu_count=8, mem_total_mb=65536)
    sources = ConfigSources.for_main_file(str(main), vac_runtime_file=runtime)
    config = load_config(sources, host_facts=host)

    s = config.settings
    assert (s.total_processors, s.mb_per_processor, s.hs06_per_processor) == (8, 3072, 10.5)
    assert (s.overload_per_processor, s.disk_gb_per_processor, s.processors_per_superslot) == (1.5, 40, 2)
    assert s.factories == ("wn02.example.com", "wn03.example.com", ".")
    assert (s.version_logger, s.fix_networking, s.draining) == (1, False, True)
    assert s.vacmon_hostport == ("vacmon.gridpp.ac.uk:8482",)
    assert dict(s.machinefeatures_options) == {"db12": "12.5"}

    lhcb = config.machinetypes["lhcb"]
    assert (lhcb.target_share, lhcb.machine_model, lhcb.machines_dir_days) == (2.0, "cernvm3", 5.0)
    assert lhcb.image_signing_dn == "/DC=ch/DC=cern/OU=computers/CN=cvm-sign01.cern.ch"
    assert lhcb.machinegroup == "/lhcb/Role=NULL/Capability=NULL"
    assert dict(lhcb.user_data_options) == {"cvmfs_proxy": "http://lhcb-squid.example.com:3128"}
    atlas = config.machinetypes["atlas"]
    assert (atlas.machine_model, atlas.user_data_proxy, atlas.legacy_proxy) == ("vm-raw", True, True)
    assert dict(atlas.user_data_options) == {"cvmfs_proxy": "http://squid.example.com:3128"}
    assert list(config.machinetypes) == ["lhcb", "atlas"]

    pipe = config.vacuum_pipes["gridpp"]
    assert (pipe.url, pipe.target_share) == ("https://repo.gridpp.ac.uk/vacproject/gridpp/gridpp.pipe", 3.0)
    assert dict(pipe.options) == {"user_data_option_cvmfs_proxy": "http://squid.example.com:3128"}

    warned = "\n".join(config.warnings)
    for line, text in [(5, "[settings] cpu_total: deprecated: use total_processors"),
                       (12, "[settings] total_machines: ignored: use total_processors"),
                       (16, "[settings] version_logger: accepted for compatibility with Vac and ignored"),
                       (17, "[settings] fix_networking: accepted for compatibility with Vac and ignored"),
                       (23, "[machinetype lhcb] vm_model: deprecated: use machine_model"),
                       (25, "[machinetype lhcb] cernvm_signing_dn: accepted for compatibility with Vac and ignored"),
                       (35, "[machinetype lhcb] log_machineoutputs: ignored: use machines_dir_days"),
                       (37, "[vmtype atlas] deprecated section kind: use [machinetype atlas]"),
                       (41, "[machinetype atlas] rootpublickey: ignored: use root_public_key in [settings]")]:
        assert f"{main}:{line}: {text}" in warned
    assert [st.path for st in config.sources] == [
        str(etc / "vac.d" / "shares.conf"), str(main), runtime, str(tmp_path / "s" / "runtime.conf")]


def test_vac_dropins_are_overridden_by_vac_conf(tmp_path):
    etc = tmp_path / "etc"
    write(etc / "vac.d" / "shares.conf", "[machinetype lhcb]\ntarget_share = 5\nfizzle_seconds = 60\n")
    main = write(etc / "vac.conf", VAC_CONF)
    sources = ConfigSources.for_main_file(str(main), vac_runtime_file=str(tmp_path / "absent"))
    config = load_config(sources, host_facts=HOST)
    assert config.machinetypes["lhcb"].target_share == 2.0  # vac.conf is read after vac.d
    assert config.machinetypes["lhcb"].fizzle_seconds == 60


def test_default_sources_are_the_etc_files():
    sources = ConfigSources.default()
    assert (sources.main_file, sources.dropin_dir, sources.main_required) == \
        ("/etc/vacfactory.conf", "/etc/vacfactory.d", False)
    assert sources.override_path("/var/lib/vacfactory") == "/var/lib/vacfactory/runtime.conf"


def test_for_main_file_uses_the_stem_for_the_dropin_directory():
    sources = ConfigSources.for_main_file("/srv/site/factory.conf")
    assert (sources.dropin_dir, sources.late_files) == ("/srv/site/factory.d", ())


def test_defaults_come_from_host_facts(tmp_path):
    config = load_config_string(minimal(tmp_path), HOST)
    s = config.settings
    assert (s.factory_name, s.total_processors) == ("wn01.example.com", 8)
    assert s.total_memory_mb is None  # no memory cap unless the admin sets one (Vac)
    assert config.origins["settings"]["total_processors"] == "default"


def test_constant_defaults_match_the_brief(tmp_path):
    s = load_config_string(minimal(tmp_path), HOST).settings
    assert (s.libvirt_uri, s.domain_type, s.cpu_mode, s.network_name, s.network_bridge) == \
        ("qemu:///system", "kvm", "host-passthrough", "vacfactory", "vacbr0")
    assert (s.cycle_seconds, s.max_starting_processors, s.starting_seconds, s.abort_on_700) == (10.0, 64, 60.0, True)
    assert (s.http_port, s.udp_port, s.nfs_exporter, s.apel_broker_port) == (80, 995, "ganesha", 61613)
    assert (s.mb_per_processor, s.overload_per_processor, s.udp_timeout_seconds) == (2048, 1.25, 10.0)
    assert (s.hs06_per_processor, s.space_key, s.shutdown_time) == (None, None, None)


def test_domain_type_test_allows_more_processors_than_the_host(tmp_path):
    config = load_config_string(minimal(tmp_path, "domain_type = test\ntotal_processors = 64\n"), HOST)
    assert config.settings.total_processors == 64


def test_machinetype_computed_defaults(tmp_path):
    text = minimal(tmp_path, """\
[machinetype lhcb]
root_image = /images/lhcb.iso
accounting_fqan = /lhcb/Role=pilot
max_wallclock_seconds = 172800
[machinetype atlas]
root_image = /images/atlas.iso
machinegroup = atlas-group
min_wallclock_seconds = 3600
""")
    config = load_config_string(text, HOST)
    lhcb, atlas = config.machinetypes["lhcb"], config.machinetypes["atlas"]
    assert (lhcb.machinegroup, lhcb.min_wallclock_seconds) == ("/lhcb/Role=pilot", 172800)
    assert (atlas.machinegroup, atlas.min_wallclock_seconds, atlas.max_wallclock_seconds) == ("atlas-group", 3600, 86400)
    assert lhcb.machinetype_path == f"{tmp_path}/machinetypes/lhcb"
    assert (lhcb.backoff_seconds, lhcb.fizzle_seconds, lhcb.machine_model) == (10, 600, "cernvm3")


def test_machinegroup_defaults_to_the_name_without_fqan(tmp_path):
    config = load_config_string(minimal(tmp_path, "[machinetype cms]\nroot_image = c.iso\n"), HOST)
    assert config.machinetypes["cms"].machinegroup == "cms"


def test_user_data_options_merge_machinetype_over_settings(tmp_path):
    text = minimal(tmp_path, """\
user_data_option_proxy = http://site-squid:3128
user_data_option_site = MAN
user_data_file_cert = /etc/site/cert.pem
user_data_file_key = key.pem
[machinetype lhcb]
root_image = /images/lhcb.iso
user_data_option_proxy = http://lhcb-squid:3128
user_data_file_key = /etc/lhcb/key.pem
[machinetype atlas]
root_image = /images/atlas.iso
""")
    config = load_config_string(text, HOST)
    lhcb, atlas = config.machinetypes["lhcb"], config.machinetypes["atlas"]
    assert dict(lhcb.user_data_options) == {"proxy": "http://lhcb-squid:3128", "site": "MAN"}
    assert dict(lhcb.user_data_files) == {"cert": "/etc/site/cert.pem", "key": "/etc/lhcb/key.pem"}
    assert dict(atlas.user_data_options) == {"proxy": "http://site-squid:3128", "site": "MAN"}
    assert dict(atlas.user_data_files) == {"cert": "/etc/site/cert.pem",
                                           "key": f"{tmp_path}/machinetypes/atlas/files/key.pem"}
    assert dict(config.settings.user_data_files) == {"cert": "/etc/site/cert.pem", "key": "key.pem"}


def test_multiline_user_data_option_keeps_its_lines(tmp_path):
    text = minimal(tmp_path, "[machinetype lhcb]\nroot_image = l.iso\nuser_data_option_script = echo one\n  echo two\n")
    config = load_config_string(text, HOST)
    assert config.machinetypes["lhcb"].user_data_options["script"] == "echo one\necho two"


def test_relative_images_resolve_under_machinetype_files_but_urls_stay(tmp_path):
    text = minimal(tmp_path, """\
[machinetype tiny]
machine_model = vm-raw
root_image = https://images.example.com/tiny.qcow2
kernel_image = vmlinuz
initrd_image = /boot/initrd.img
kernel_cmdline = console=ttyS0 quiet
machinetype_path = /srv/tiny
user_data = user_data
""")
    tiny = load_config_string(text, HOST).machinetypes["tiny"]
    assert tiny.root_image == "https://images.example.com/tiny.qcow2"
    assert (tiny.kernel_image, tiny.initrd_image) == ("/srv/tiny/files/vmlinuz", "/boot/initrd.img")
    assert (tiny.user_data, tiny.kernel_cmdline) == ("/srv/tiny/files/user_data", "console=ttyS0 quiet")


def test_singularity_loads_but_is_not_startable(tmp_path):
    text = minimal(tmp_path, "[machinetype c]\nmachine_model = singularity\nroot_image = /cvmfs/x/image\n")
    config = load_config_string(text, HOST, source="f.conf")
    assert config.machinetypes["c"].startable is False
    assert any(w.startswith("f.conf:5: [machinetype c] machine_model:") and "never be started" in w
               for w in config.warnings)


def test_docker_with_an_image_reference_is_startable(tmp_path):
    text = minimal(tmp_path, "[machinetype c]\nmachine_model = docker\nroot_image = docker://lhcb/worker:1.2\n"
                             "tmp_binds = /scratch /tmp/pilot\ncvmfs_repositories = lhcb.cern.ch\n")
    config = load_config_string(text, HOST, source="f.conf")
    c = config.machinetypes["c"]
    assert (c.startable, c.root_image, c.tmp_binds) == (True, "docker://lhcb/worker:1.2", ("/scratch", "/tmp/pilot"))
    assert config.warnings == ()
    assert (config.settings.container_socket, config.settings.container_stop_seconds) == ("/var/run/docker.sock", 30)


@pytest.mark.parametrize("image,why", [
    (None, "root_image = docker://IMAGE[:TAG] is required"),
    ("docker://LHCb/Worker", "is not a container image reference"),
    ("docker://lhcb/worker:1 --privileged", "is not a valid URL"),
    ("/images/lhcb.img", "must start with docker://"),
])
def test_docker_needs_a_valid_docker_image(tmp_path, image, why):
    line = f"root_image = {image}\n" if image else ""
    text = minimal(tmp_path, "[machinetype c]\nmachine_model = docker\n" + line)
    with pytest.raises(ConfigError) as caught:
        load_config_string(text, HOST, source="f.conf")
    assert why in str(caught.value)


@pytest.mark.parametrize("path", ["/", "/var/spool/joboutputs", "/etc", "/user_data/x", "/a/../b", "relative"])
def test_tmp_binds_may_not_cover_the_containers_own_binds(tmp_path, path):
    text = minimal(tmp_path, f"[machinetype c]\nmachine_model = docker\nroot_image = docker://w\ntmp_binds = {path}\n")
    with pytest.raises(ConfigError) as caught:
        load_config_string(text, HOST, source="f.conf")
    assert "f.conf:7: [machinetype c] tmp_binds" in str(caught.value)


def test_vm_options_in_a_docker_machinetype_are_ignored_with_a_warning(tmp_path):
    text = minimal(tmp_path, "[machinetype c]\nmachine_model = docker\nroot_image = docker://w\n"
                             "kernel_image = /boot/vmlinuz\n")
    config = load_config_string(text, HOST, source="f.conf")
    assert config.machinetypes["c"].startable is True
    assert any("kernel_image: ignored for machine_model docker" in w for w in config.warnings), config.warnings


def test_vm_models_are_startable(tmp_path):
    config = load_config_string(minimal(tmp_path, "[machinetype v]\nmachine_model = cernvm4\nroot_image = v.img\n"), HOST)
    assert config.machinetypes["v"].startable is True


def test_machinetype_disk_larger_than_settings_is_capped_with_warning(tmp_path):
    text = minimal(tmp_path, "disk_gb_per_processor = 20\n[machinetype big]\nroot_image = b.iso\n"
                             "disk_gb_per_processor = 50\n[machinetype small]\nroot_image = s.iso\n"
                             "disk_gb_per_processor = 10\n")
    config = load_config_string(text, HOST, source="f.conf")
    assert config.machinetypes["big"].disk_gb_per_processor == 20
    assert config.machinetypes["small"].disk_gb_per_processor == 10
    assert "f.conf:7: [machinetype big] disk_gb_per_processor: larger than the [settings] value (20): using 20" \
        in config.warnings


@pytest.mark.parametrize("word,expected", [("yes", True), ("No", False), ("TRUE", True), ("false", False),
                                           ("1", True), ("0", False), ("On", True), ("off", False)])
def test_booleans_accept_vac_spellings_in_any_case(tmp_path, word, expected):
    config = load_config_string(minimal(tmp_path, f"draining = {word}\n"), HOST)
    assert config.settings.draining is expected


def test_settings_attribute_typo_is_an_attribute_error(tmp_path):
    config = load_config_string(minimal(tmp_path), HOST)
    with pytest.raises(AttributeError):
        config.settings.total_procesors  # noqa: B018 - the typo is the point


def test_config_values_are_frozen(tmp_path):
    config = load_config_string(minimal(tmp_path, "user_data_option_a = b\n"), HOST)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.settings.total_processors = 1
    with pytest.raises(TypeError):
        config.settings.user_data_options["a"] = "c"  # type: ignore[index]


def test_model_fields_are_exactly_the_table_rows():
    settings_fields = [f.name for f in dataclasses.fields(Settings)]
    assert settings_fields == [o.name for o in table.options_of(table.SETTINGS)] + \
        ["user_data_options", "user_data_files", "machinefeatures_options"]
    mt_fields = [f.name for f in dataclasses.fields(MachineType)]
    assert mt_fields == ["name", "startable"] + [o.name for o in table.options_of(table.MACHINETYPE)] + \
        ["user_data_options", "user_data_files"]
    assert [f.name for f in dataclasses.fields(VacuumPipe)] == ["prefix", "vacuum_pipe_url", "target_share", "options"]


def test_every_option_has_a_doc_and_a_default_that_parses():
    for option in table.OPTIONS:
        assert option.doc, option.name
        if option.default is not None and not isinstance(option.default, table.Computed):
            assert option.type.parse(option.type.format(option.default)) == option.default, option.name


def test_option_names_and_aliases_are_unique_per_section():
    for section in table.SECTIONS:
        names = [o.name for o in table.options_of(section)]
        aliases = [a for o in table.options_of(section) for a in o.aliases]
        assert len(set(names)) == len(names)
        assert not set(aliases) & set(names)
        assert len(set(aliases)) == len(aliases)


def test_effective_options_mask_secrets_and_name_origins(tmp_path):
    config = load_config_string(minimal(tmp_path, "space_key = hunter2\n"), HOST, source="f.conf")
    settings = dict(effective_options(config))["settings"]
    by_name = {o.name: o for o in settings}
    assert (by_name["space_key"].text, by_name["space_key"].origin) == ("********", "f.conf:4")
    assert "hunter2" not in repr(settings)
    assert (by_name["mb_per_processor"].text, by_name["mb_per_processor"].origin) == ("2048", "default")


def test_hostfacts_probe_reads_proc_files(tmp_path):
    write(tmp_path / "cpuinfo", "processor\t: 0\nmodel name\t: x\n\nprocessor\t: 1\nmodel name\t: x\n\n"
                                "processor\t: 2\n")
    write(tmp_path / "meminfo", "MemTotal:       24684512 kB\nMemFree:  1 kB\n")
    facts = HostFacts.probe(proc=str(tmp_path))
    assert (facts.cpu_count, facts.mem_total_mb) == (3, 24684512 // 1024)
    assert facts.fqdn


def test_hostfacts_fall_back_when_proc_is_unreadable(tmp_path):
    assert count_processors(str(tmp_path / "absent")) == (os.cpu_count() or 1)
    assert memory_total_mb(str(tmp_path / "absent")) == 0


def test_secret_values_stay_out_of_repr(tmp_path):
    config = load_config_string(minimal(tmp_path, "space_key = hunter2\n"), HOST)
    assert config.settings.space_key == "hunter2"
    assert "hunter2" not in repr(config.settings) and "hunter2" not in repr(config)


def test_hidden_and_non_conf_dropins_are_skipped(tmp_path):
    write(tmp_path / "vacfactory.d" / ".#editing.conf", "[settings]\ndraining = garbage\n")
    write(tmp_path / "vacfactory.d" / "site.conf.rpmnew", "[settings]\ndraining = garbage\n")
    write(tmp_path / "vacfactory.d" / "site.conf", "[settings]\ndraining = yes\n")
    main = write(tmp_path / "vacfactory.conf", minimal(tmp_path))
    config = load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert config.settings.draining is True
    assert [os.path.basename(s.path) for s in config.sources] == ["site.conf", "vacfactory.conf", "runtime.conf"]


def test_lists_accept_tabs_and_continuation_lines(tmp_path):
    text = minimal(tmp_path, "factories = wn02.example.com\tWN03.example.com\n    wn04.example.com\n")
    config = load_config_string(text, HOST)
    assert config.settings.factories == ("wn02.example.com", "wn03.example.com", "wn04.example.com")


def test_relative_state_dir_is_relative_to_the_file_that_sets_it(tmp_path):
    from vacfactory.config.hostfacts import HostFacts
    from vacfactory.config.loader import ConfigSources, load_config

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "demo.conf").write_text(
        "[settings]\nvac_space = s.example.org\nfactory_name = f.example.org\nstate_dir = ../state\n"
    )
    config = load_config(ConfigSources.for_main_file(str(conf / "demo.conf")),
                         host_facts=HostFacts(fqdn="h.example.org", cpu_count=2, mem_total_mb=4096))
    assert config.settings.state_dir == str(tmp_path / "state")


IGNORED_SETTINGS = {
    "volume_group": ("vac_volume_group", "VM disks are always qcow2 files in <state_dir>/machines/<uuid>/disks/"),
    "singularity_user": ("vacsing", "vacfactory starts no Singularity containers"),
    "fix_networking": ("false", "the private VM network is always checked every minute and repaired"),
    "gocdb_cert_file": ("/etc/grid-security/hostcert.pem", "vacfactory never updates GOCDB"),
    "gocdb_key_file": ("/etc/grid-security/hostkey.pem", "vacfactory never updates GOCDB"),
    "version_logger": ("true", "vacfactory sends nothing to Vac's version logger"),
}
IGNORED_MACHINETYPE = {
    "cernvm_signing_dn": ("/DC=ch/DC=cern/OU=computers/CN=cvm-sign01.cern.ch",
                          "root images are not signature-checked; pin an image with root_image_sha256"),
}


def test_options_vac_had_that_vacfactory_ignores_load_with_one_warning_each(tmp_path):
    settings = "".join(f"{name} = {value}\n" for name, (value, _) in IGNORED_SETTINGS.items())
    machinetype = "".join(f"{name} = {value}\n" for name, (value, _) in IGNORED_MACHINETYPE.items())
    main = write(tmp_path / "vacfactory.conf",
                 minimal(tmp_path, settings + "[machinetype lhcb]\nroot_image = /images/lhcb.iso\n" + machinetype))
    config = load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    expected = []
    line = 4
    for title, table_part in (("settings", IGNORED_SETTINGS), ("machinetype lhcb", IGNORED_MACHINETYPE)):
        for name, (_, instead) in table_part.items():
            expected.append(f"{main}:{line}: [{title}] {name}: accepted for compatibility with Vac and ignored: "
                            f"{instead}")
            line += 1
        line += 2  # the [machinetype lhcb] header and its root_image
    # one warning per option: no second "deprecated" one for an alias (cernvm_signing_dn) or a
    # legacy value (version_logger = true)
    assert len(config.warnings) == len(expected)
    for warning, start in zip(config.warnings, expected):
        assert warning.startswith(start), (warning, start)
    # still parsed, so `config show` shows what the file says
    assert (config.settings.volume_group, config.settings.version_logger) == ("vac_volume_group", 1)


def test_every_ignored_option_is_documented_as_ignored():
    ignored = [row for row in table.OPTIONS if row.ignored]
    assert {row.name for row in ignored} == set(IGNORED_SETTINGS) | {"image_signing_dn"}
    for row in ignored:
        assert "Accepted for compatibility with Vac and ignored (with a warning when set): " \
            in table.option_doc(row), row.name


def test_unset_ignored_options_give_no_warning(tmp_path):
    config = load_config_string(minimal(tmp_path, "[machinetype lhcb]\nroot_image = /images/lhcb.iso\n"), HOST)
    assert config.warnings == ()


def test_vac_domain_type_xen_loads_as_kvm_with_a_warning(tmp_path):
    main = write(tmp_path / "vacfactory.conf", minimal(tmp_path, "domain_type = xen\n"))
    config = load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    assert config.settings.domain_type == "kvm"
    assert config.warnings == (f"{main}:4: [settings] domain_type: 'xen' is deprecated here: use kvm",)


def test_deprecated_scratch_gb_sets_disk_gb_per_processor_with_a_warning(tmp_path):
    config = load_config_string(minimal(tmp_path, "scratch_gb = 25\n[machinetype a]\nroot_image = a.img\n"),
                                HOST, source="f.conf")
    assert config.settings.disk_gb_per_processor == 25
    assert config.warnings == ("f.conf:4: [settings] scratch_gb: deprecated: use disk_gb_per_processor",)
    assert not hasattr(config.settings, "scratch_gb")


def test_scratch_gb_and_disk_gb_per_processor_together_are_an_error_naming_both(tmp_path):
    from vacfactory.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        load_config_string(minimal(tmp_path, "scratch_gb = 25\ndisk_gb_per_processor = 30\n"), HOST, source="f.conf")
    assert "f.conf:5: [settings] disk_gb_per_processor: also given as scratch_gb at line 4" in str(error.value)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_bundled_demo_conf_loads_with_its_state_dir_relative_to_the_file():
    main = os.path.join(REPO, "conf", "demo.conf")
    config = load_config(ConfigSources.for_main_file(main), host_facts=HOST)
    s = config.settings
    state_dir = os.path.join(REPO, "demo-state")
    assert s.state_dir == state_dir  # "../demo-state" from conf/, wherever the checkout is
    assert (s.factory_name, s.domain_type, s.total_processors, s.mb_per_processor) == \
        ("factory1.demo.vacfactory.invalid", "qemu", 2, 256)
    assert list(config.machinetypes) == ["demo-ok", "demo-nowork"]
    ok = config.machinetypes["demo-ok"]
    assert ok.kernel_image == os.path.join(state_dir, "machinetypes", "demo-ok", "files", "vmlinux")
    assert dict(ok.user_data_options)["outcome"] == "200 Success"
    assert config.warnings == ()
    assert config.sources[0].path == main


def test_the_bundled_example_site_conf_loads_without_errors():
    main = os.path.join(REPO, "conf", "example-site.conf")
    host = HostFacts(fqdn="vac01-wn02.example.ac.uk", cpu_count=64, mem_total_mb=262144)
    config = load_config(ConfigSources.for_main_file(main), host_facts=host)
    s = config.settings
    assert (s.factory_name, s.total_processors) == ("vac01-wn02.example.ac.uk", 64)  # computed per host
    assert (s.vac_space, s.disk_gb_per_processor, s.processors_per_superslot) == ("vac01.example.ac.uk", 40, 8)
    assert s.factories[-1] == "."
    assert list(config.machinetypes) == ["lhcb", "atlas"]
    assert config.machinetypes["lhcb"].machine_model == "cernvm3"
    assert config.machinetypes["atlas"].root_image == \
        os.path.join(s.state_dir, "machinetypes", "atlas", "files", "atlas-vm.qcow2")
    assert list(config.vacuum_pipes) == ["gridpp"]
    # the only warning possible on a host that never fetched the pipe
    assert all("pipe gridpp" in w and "not fetched yet" in w for w in config.warnings)
