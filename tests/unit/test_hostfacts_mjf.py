"""engine.hostfacts_mjf: host facts as extra machinefeatures keys, from made-up /proc trees."""

from __future__ import annotations

import pytest

from vacfactory.core import mjf
from vacfactory.engine.hostfacts_mjf import (
    HOST_KEYS,
    MAX_VALUE,
    SYSLOG_KEY,
    clean_value,
    host_machinefeatures,
    merge_extras,
    syslog_machinefeatures,
    syslog_substitutions,
    x86_64_level,
)

V3_FLAGS = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 "
            "ht syscall nx lm constant_tsc pni ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt xsave avx f16c lahf_lm "
            "abm bmi1 avx2 bmi2")


def cpu_block(n: int, package: int, core: int, flags: str = V3_FLAGS) -> str:
    return (f"processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\n"
            f"model name\t: Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz\nstepping\t: 4\nmicrocode\t: 0x2006e05\n"
            f"physical id\t: {package}\ncore id\t\t: {core}\nflags\t\t: {flags}\n\n")


def make_host(tmp_path, cpuinfo: str, osrelease: str = "6.1.0-18-amd64\n",
              os_release: str = 'NAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'):
    proc = tmp_path / "proc"
    (proc / "sys" / "kernel").mkdir(parents=True)
    (proc / "cpuinfo").write_text(cpuinfo)
    (proc / "sys" / "kernel" / "osrelease").write_text(osrelease)
    release = tmp_path / "os-release"
    release.write_text(os_release)
    return str(proc), str(release)


def test_two_socket_intel_host(tmp_path):
    # 2 packages x 2 cores x 2 threads
    blocks = [cpu_block(n, package=n // 4, core=(n // 2) % 2) for n in range(8)]
    proc, release = make_host(tmp_path, "".join(blocks))
    facts = host_machinefeatures(proc, "QEMU 7.2.0 libvirt 9.0.0 kvm", os_release=release, arch="x86_64")
    assert facts == {
        "cpu_model": "Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz",
        "cpu_vendor": "GenuineIntel",
        "cpu_family": "6",
        "cpu_model_id": "85",
        "cpu_stepping": "4",
        "cpu_microcode": "0x2006e05",
        "cpu_arch": "x86_64",
        "cpu_x86_64_level": "3",
        "host_processors": "8",
        "host_cores": "4",
        "host_sockets": "2",
        "kernel_version": "6.1.0-18-amd64",
        "os_release": "Debian GNU/Linux 12 (bookworm)",
        "hypervisor": "QEMU 7.2.0 libvirt 9.0.0 kvm",
    }


def test_arm64_cpuinfo_without_model_name(tmp_path):
    block = ("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
             "CPU architecture: 8\nCPU part\t: 0xd0c\n\n")
    proc, release = make_host(tmp_path, block * 4)
    facts = host_machinefeatures(proc, os_release=release, arch="aarch64")
    assert facts["cpu_vendor"] == "implementer 0x41 part 0xd0c"
    assert facts["cpu_arch"] == "aarch64" and facts["host_processors"] == "4"
    assert "cpu_model" not in facts and "cpu_x86_64_level" not in facts and "hypervisor" not in facts


def test_hostile_values_become_one_bounded_printable_line(tmp_path):
    block = ("processor\t: 0\nvendor_id\t: Evil\x1b[31mCorp\nmodel name\t: "
             + "A" * 1000 + "\t\x07 x\n\n")
    proc, release = make_host(tmp_path, block, osrelease="6.1\n\n-evil\x00",
                              os_release="PRETTY_NAME='Fedora\u202e 40'\n")
    facts = host_machinefeatures(proc, "kvm\nsecond line", os_release=release, arch="x86_64")
    for key, value in facts.items():
        assert len(value) <= MAX_VALUE
        assert all(0x20 <= ord(c) <= 0x7e for c in value), (key, value)
    assert facts["cpu_vendor"] == "Evil?[31mCorp"
    assert facts["kernel_version"] == "6.1 -evil?"
    assert facts["hypervisor"] == "kvm second line"
    assert facts["os_release"] == "Fedora? 40"
    assert len(facts["cpu_model"]) == MAX_VALUE


def test_unreadable_host_leaves_keys_out_without_raising(tmp_path):
    facts = host_machinefeatures(str(tmp_path / "no-proc"), os_release=str(tmp_path / "none"), arch="")
    assert facts == {}


def test_os_release_without_pretty_name_uses_name_and_version(tmp_path):
    proc, release = make_host(tmp_path, cpu_block(0, 0, 0), os_release='NAME=AlmaLinux\nVERSION="9.3 (Shamrock)"\n')
    assert host_machinefeatures(proc, os_release=release, arch="x86_64")["os_release"] == "AlmaLinux 9.3 (Shamrock)"


@pytest.mark.parametrize("flags,level", [
    ("fpu cx8 cmov mmx fxsr sse sse2 lm", 1),
    ("fpu cx8 cmov mmx fxsr sse sse2 lm cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3", 2),
    (V3_FLAGS, 3),
    (V3_FLAGS + " avx512f avx512bw avx512cd avx512dq avx512vl", 4),
    (V3_FLAGS.replace(" avx2", "") + " avx512f avx512bw avx512cd avx512dq avx512vl", 2),  # no v3, so no v4
    ("fpu cx8 cmov mmx fxsr sse sse2", None),  # 32-bit only
])
def test_x86_64_level_needs_every_flag_of_each_level(flags, level):
    assert x86_64_level(flags.split()) == level


def test_real_host_gives_valid_keys_that_core_mjf_publishes(tmp_path):
    facts = host_machinefeatures(hypervisor="test")
    assert facts["hypervisor"] == "test" and "kernel_version" in facts and "host_processors" in facts
    assert set(facts) <= set(HOST_KEYS)
    standard = set(mjf.MACHINEFEATURES_KEYS + mjf.LEGACY_MACHINEFEATURES_KEYS)
    extras = merge_extras(facts, syslog_machinefeatures("169.254.169.254:514"), {"site_extra": "1"})
    inp = mjf.MJFInput(job_id="u-1", processors=2, jobstart=0, shutdown_time=3600, mb_per_processor=2048,
                       hs06_per_processor=10.0, extra_machinefeatures=extras)
    published = mjf.machinefeatures(inp)
    assert published["syslog"] == "169.254.169.254:514" and published["site_extra"] == "1"
    assert published["cpu_arch"] == facts["cpu_arch"]
    assert published["total_cpu"] == "2"  # standard keys untouched
    assert all(mjf.valid_key(k) for k in facts) and not standard & set(facts)


def test_site_options_override_host_facts_and_the_syslog_key():
    merged = merge_extras({"cpu_model": "real", "kernel_version": "6.1"}, {"syslog": "a:1"},
                          {"kernel_version": "", "syslog": "b:2", "extra": "x"})
    assert merged == {"cpu_model": "real", "kernel_version": "", "syslog": "b:2", "extra": "x"}


def test_syslog_key_and_substitution():
    assert syslog_machinefeatures("169.254.169.254:514") == {SYSLOG_KEY: "169.254.169.254:514"}
    assert syslog_machinefeatures("") == {} and syslog_machinefeatures(None) == {}
    assert syslog_substitutions("10.0.0.1:514") == {"syslog_server": "10.0.0.1:514"}
    assert syslog_substitutions("") == {"syslog_server": ""}


def test_syslog_substitution_renders_in_user_data():
    from vacfactory.core import userdata

    table = userdata.standard_substitutions(
        space="s", machinetype="m", machine_hostname="h", manager_version="v", manager_hostname="f", uuid="u",
        machinefeatures_url="mf", jobfeatures_url="jf", joboutputs_url="jo",
        extra=syslog_substitutions("169.254.169.254:514"))
    text = userdata.render_user_data("*.* @##user_data_syslog_server##\n", table)
    assert text == "*.* @169.254.169.254:514\n"


def test_clean_value_collapses_whitespace():
    assert clean_value("  a \t b\n c  ") == "a b c"
