"""`vacfactory config check` predicts runtime failures: each finding names file:line.

Real files, real qemu-img images, real sockets and the libvirt test driver; host facts (the
processor count and memory the rules compare against) are passed in as values.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time

import pytest

from tests.unit.test_config_loading import write
from tests.ports import free_port
from vacfactory.cli.common import EXIT_CONFIG, EXIT_OK
from vacfactory.cli.main import main
from vacfactory.config import loader, predict
from vacfactory.config.predict import online as predict_online
from vacfactory.config.hostfacts import HostFacts
from vacfactory.hypervisor.disks import image_format
from vacfactory.state.lock import StateLock

HOST = HostFacts(fqdn="wn01.example.com", cpu_count=64, mem_total_mb=65536)
KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGfxHxj1ZCVyYtvq8Q8NRc7Rre0tJ0XyL9RLGr4tKb0b "
       "root@wn01\n")


def conf(tmp_path, settings: str = "", machinetypes: str = "", name: str = "vacfactory.conf",
         state=None) -> str:
    """A configuration whose [settings] starts at line 1; extra settings begin at line 6."""
    if state is None:
        state = tmp_path / "state"
        os.makedirs(state, exist_ok=True)
    return write(tmp_path / name, f"""\
[settings]
vac_space = vac01.example.com
factory_name = wn01.example.com
state_dir = {state}
domain_type = test
{settings}
{machinetypes}""")


def load(path: str):
    return loader.load_config(loader.ConfigSources.for_main_file(path), host_facts=HOST)


def findings(path: str, memory_mb: int = 65536):
    config = load(path)
    probes = predict.HostProbes(memory_mb=memory_mb, image_format=image_format)
    return predict.ordered(predict.predict(config, [path], probes), [path])


def texts(found, severity=None):
    return [f"{f.severity}: {f}" for f in found if severity is None or f.severity == severity]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


# --------------------------------------------------------------------------- files


def test_missing_root_image_of_a_started_machinetype_is_an_error_at_its_line(tmp_path):
    path = conf(tmp_path, machinetypes="[machinetype lhcb]\ntarget_share = 1\nroot_image = /nonexistent/lhcb.iso\n")
    found = findings(path)
    assert texts(found, predict.ERROR) == [
        f"error: {path}:9: [machinetype lhcb] root_image: /nonexistent/lhcb.iso: no such file"]


def test_missing_root_image_of_a_share_0_machinetype_is_only_a_warning(tmp_path):
    path = conf(tmp_path, machinetypes="[machinetype lhcb]\nroot_image = missing.iso\n")
    found = findings(path)
    image = str(tmp_path / "state" / "machinetypes" / "lhcb" / "files" / "missing.iso")
    assert f"warning: {path}:8: [machinetype lhcb] root_image: {image}: no such file " \
           "(not started while target_share is 0)" in texts(found)
    assert not texts(found, predict.ERROR)


def test_vm_raw_image_with_a_backing_file_is_refused_like_the_engine_does(tmp_path):
    base, overlay, good = tmp_path / "base.raw", tmp_path / "overlay.qcow2", tmp_path / "good.qcow2"
    qemu_img("create", "-q", "-f", "raw", str(base), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay))
    qemu_img("create", "-q", "-f", "qcow2", str(good), "1M")
    path = conf(tmp_path, machinetypes=f"""\
[machinetype bad]
machine_model = vm-raw
target_share = 1
root_image = {overlay}
[machinetype good]
machine_model = vm-raw
target_share = 1
root_image = {good}
""")
    errors = texts(findings(path), predict.ERROR)
    assert errors == [f"error: {path}:10: [machinetype bad] root_image: {overlay}: image has a backing file; "
                      "refusing to use it as a base"]


def test_kernel_user_data_and_proxy_files_are_checked(tmp_path):
    os.makedirs(tmp_path / "adir")
    path = conf(tmp_path, machinetypes=f"""\
[machinetype lhcb]
target_share = 1
machine_model = vm-raw
kernel_image = /nonexistent/vmlinuz
user_data = {tmp_path / 'adir'}
user_data_proxy = true
""")
    errors = texts(findings(path), predict.ERROR)
    mt_path = tmp_path / "state" / "machinetypes" / "lhcb"
    assert errors == [
        f"error: {path}:10: [machinetype lhcb] kernel_image: /nonexistent/vmlinuz: no such file",
        f"error: {path}:11: [machinetype lhcb] user_data: {tmp_path / 'adir'}: is a directory, not a file",
        f"error: {path}:12: [machinetype lhcb] user_data_proxy: needs x509cert.pem in {mt_path}: "
        f"{mt_path}/x509cert.pem: no such file",
        f"error: {path}:12: [machinetype lhcb] user_data_proxy: needs x509key.pem in {mt_path}: "
        f"{mt_path}/x509key.pem: no such file",
    ]


def test_a_user_data_template_over_the_engine_limit_is_an_error(tmp_path):
    template = tmp_path / "big.tmpl"
    with open(template, "wb") as f:
        f.truncate(predict.MAX_TEMPLATE_BYTES + 1)
    path = conf(tmp_path, machinetypes=f"[machinetype lhcb]\ntarget_share = 1\nroot_image = /etc/hostname\n"
                                       f"user_data = {template}\n")
    assert texts(findings(path), predict.ERROR) == [
        f"error: {path}:10: [machinetype lhcb] user_data: {template}: {predict.MAX_TEMPLATE_BYTES + 1} bytes, "
        f"more than the {predict.MAX_TEMPLATE_BYTES} the engine reads"]


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("content, expected", [
    (None, "No such file or directory: no ssh access: VMs are created without a root key (as Vac does)"),
    ("not a key\n", "holds no OpenSSH public key line (such as 'ssh-ed25519 AAAA...'): no ssh access"),
    (KEY, None),
    ("# two keys\n" + KEY + KEY.replace("root@", "admin@"), None),
])
def test_root_public_key_problems_are_warnings_never_errors(tmp_path, content, expected):
    key = tmp_path / "id.pub"
    if content is not None:
        write(key, content)
    path = conf(tmp_path, settings=f"root_public_key = {key}")
    found = [f for f in findings(path) if f.option == "root_public_key"]
    if expected is None:
        assert found == []
    else:
        assert [(f.severity, f.line) for f in found] == [(predict.WARNING, 6)]
        assert found[0].message.endswith(expected) and str(key) in found[0].message


def test_an_unreadable_space_key_file_is_an_error(tmp_path):
    path = conf(tmp_path, settings=f"space_key_file = {tmp_path / 'no-key'}")
    errors = [f for f in findings(path) if f.severity == predict.ERROR]
    assert [(f.option, f.line) for f in errors] == [("space_key_file", 6)]
    assert "cannot read the space key" in errors[0].message


# --------------------------------------------------------------------------- state_dir


def test_state_dir_that_is_a_file_or_under_a_file_is_an_error(tmp_path):
    a_file = write(tmp_path / "plain", "x")
    for state, why in ((a_file, f"{a_file} exists and is not a directory: the daemon cannot start"),
                       (f"{a_file}/state", f"{a_file}/state cannot be created: {a_file} is not a directory")):
        path = conf(tmp_path, state=state, name="x.conf")
        found = [f for f in findings(path) if f.option == "state_dir"]
        assert [(f.severity, f.line, f.message) for f in found] == [(predict.ERROR, 4, why)]


def test_state_dir_missing_but_creatable_is_a_note_and_an_existing_one_is_probed(tmp_path):
    path = conf(tmp_path, state=tmp_path / "new" / "state")
    found = [f for f in findings(path) if f.option == "state_dir"]
    assert [(f.severity, f.line) for f in found] == [(predict.NOTE, 4)]
    path = conf(tmp_path)
    assert [f for f in findings(path) if f.option == "state_dir"] == []
    assert os.listdir(tmp_path / "state") == []  # the write probe left nothing behind


# --------------------------------------------------------------------------- shares, processors, memory


def test_every_share_0_is_a_warning_at_the_first_machinetype_header(tmp_path):
    path = conf(tmp_path, machinetypes="[machinetype lhcb]\nroot_image = /etc/hostname\n"
                                       "[machinetype atlas]\nroot_image = /etc/hostname\n")
    assert texts(findings(path), predict.WARNING) == [
        f"warning: {path}:7: [machinetype lhcb] target_share: every machinetype's target_share is 0 "
        "(lhcb, atlas): no VM will ever be started"]


def test_max_processors_above_the_superslot_is_a_warning_naming_the_cap(tmp_path):
    path = conf(tmp_path, settings="total_processors = 8\nprocessors_per_superslot = 2",
                machinetypes="[machinetype lhcb]\ntarget_share = 1\nroot_image = /etc/hostname\n"
                             "max_processors = 8\n")
    assert texts(findings(path), predict.WARNING) == [
        f"warning: {path}:11: [machinetype lhcb] max_processors: 8, but VMs get at most 2 processors "
        "(processors_per_superslot = 2 in [settings])"]


def test_min_processors_that_never_fits_and_an_unusable_last_superslot_are_warnings(tmp_path):
    path = conf(tmp_path, settings="total_processors = 10\nprocessors_per_superslot = 4\nmax_starting_processors = 3",
                machinetypes="[machinetype big]\ntarget_share = 1\nroot_image = /etc/hostname\n"
                             "min_processors = 4\nmax_processors = 4\n"
                             "[machinetype three]\ntarget_share = 1\nroot_image = /etc/hostname\n"
                             "min_processors = 3\nmax_processors = 4\n")
    warnings = texts(findings(path), predict.WARNING)
    assert warnings == [
        f"warning: {path}:7: [settings] processors_per_superslot: total_processors = 10 is not a multiple "
        "of processors_per_superslot = 4: the last 2 can only take VMs of at most 2 processors, and every "
        "machinetype's min_processors is larger: they are never used",
        f"warning: {path}:12: [machinetype big] min_processors: 4 processors needed, but a VM gets at most 3 "
        "(max_starting_processors = 3): this machinetype is never started",
        f"warning: {path}:18: [machinetype three] max_processors: 4, but VMs get at most 3 processors "
        "(max_starting_processors = 3 in [settings])",
    ]


def test_min_processors_above_the_superslot_is_left_to_the_loaders_own_warning(tmp_path):
    path = conf(tmp_path, settings="total_processors = 8\nprocessors_per_superslot = 2",
                machinetypes="[machinetype big]\ntarget_share = 1\nroot_image = /etc/hostname\n"
                             "min_processors = 4\nmax_processors = 4\n")
    assert [f for f in findings(path) if f.option == "min_processors"] == []
    assert any("min_processors: 4 is more than processors_per_superslot (2)" in w for w in load(path).warnings)


def test_memory_over_the_host_is_an_overcommit_warning_not_an_error(tmp_path):
    path = conf(tmp_path, settings="domain_type = qemu\ntotal_processors = 32\nmb_per_processor = 4096\n"
                                   "total_memory_mb = 131072",
                machinetypes="[machinetype lhcb]\ntarget_share = 1\nroot_image = /etc/hostname\n")
    path = write(path, open(path).read().replace("domain_type = test\n", ""))
    found = findings(path, memory_mb=65536)
    assert texts(found, predict.ERROR) == []
    assert texts(found, predict.WARNING) == [
        f"warning: {path}:7: [settings] mb_per_processor: 32 processors x 4096 MiB = 131072 MiB, more than "
        "this host's 65536 MiB: memory is overcommitted (vac.conf(5) allows it; if the VMs use it all the "
        "host swaps or the kernel kills VMs)"]


def test_a_memory_cap_below_the_vms_is_a_warning_naming_unused_processors(tmp_path):
    path = conf(tmp_path, settings="total_processors = 8\nmb_per_processor = 900000\ntotal_memory_mb = 65536",
                machinetypes="[machinetype lhcb]\ntarget_share = 1\nroot_image = /etc/hostname\n")
    warnings = texts(findings(path), predict.WARNING)
    assert warnings == [
        f"warning: {path}:7: [settings] mb_per_processor: 900000 MiB per processor: the smallest VM of "
        "machinetype lhcb (1 x 900000 MiB) does not fit in total_memory_mb = 65536: it is never started",
        f"warning: {path}:8: [settings] total_memory_mb: 65536 MiB holds VMs for only 0 of the 8 processors "
        "(mb_per_processor = 900000): 8 processors are never used",
    ]


# --------------------------------------------------------------------------- ' #'


def test_hash_inside_a_value_is_a_warning_saying_vac_keeps_it_too(tmp_path):
    path = conf(tmp_path, settings="description = our site  # the big one\n# a real comment\n"
                                   "factories = .\n  other.example.com # continued\n"
                                   "user_data_option_script = echo hi # shell keeps this\n  # a comment line")
    found = predict.inline_comments([path])
    assert [(f.line, f.option) for f in found] == [(6, "description"), (9, "factories")]
    assert "contains ' #': that is part of the value, not a comment (Vac's parser keeps it too" \
           in found[0].message


def test_hash_hint_is_shown_even_when_the_value_does_not_parse(tmp_path, capsys):
    path = conf(tmp_path, settings="total_processors = 4 # all")
    assert main(["--config", path, "config", "check", "--offline"]) == EXIT_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"warning: {path}:6: [settings] total_processors: the value '4 # all' contains ' #'")
    assert err[-2:] == [f"{path}:6: [settings] total_processors: '4 # all' is not an integer",
                        "configuration invalid: 1 error"]


# --------------------------------------------------------------------------- vacuum pipes


def pipe_conf(tmp_path, meta=None, cache=False) -> str:
    pipes = tmp_path / "state" / "pipescache"
    if meta is not None:
        write(pipes / "gridpp.meta.json", json.dumps(meta))
    if cache:
        write(pipes / "gridpp.pipe", json.dumps({"machinetypes": [
            {"suffix": "dune", "target_share": 1, "root_image": "https://images.example.com/dune.img"}]}))
    return conf(tmp_path, machinetypes="[vacuum_pipe gridpp]\n"
                                       "vacuum_pipe_url = https://repo.example.com/gridpp.pipe\n"
                                       "target_share = 1\n")


def test_pipe_never_tried_says_not_fetched_yet(tmp_path):
    result = loader.check_config(loader.ConfigSources.for_main_file(pipe_conf(tmp_path)), HOST)
    assert any("not fetched yet" in w for w in result.warnings)


def test_pipe_whose_fetch_failed_shows_the_error_not_not_fetched_yet(tmp_path):
    attempted = time.time() - 60
    path = pipe_conf(tmp_path, meta={"url": "https://repo.example.com/gridpp.pipe", "attempted": attempted,
                                     "error": "cannot fetch: HTTP 404 Not Found"})
    result = loader.check_config(loader.ConfigSources.for_main_file(path), HOST)
    pipe_warnings = [w for w in result.warnings if "gridpp" in w]
    assert len(pipe_warnings) == 1 and "not fetched yet" not in pipe_warnings[0]
    assert f"the last fetch at {predict.utc(attempted)} failed: cannot fetch: HTTP 404 Not Found" in pipe_warnings[0]


def test_pipe_with_a_cache_and_a_failed_refetch_warns_at_the_url_line(tmp_path):
    path = pipe_conf(tmp_path, cache=True, meta={
        "url": "https://repo.example.com/gridpp.pipe", "fetched": 1700000000, "attempted": 1800000000,
        "error": "cannot fetch: connection refused"})
    found = [f for f in findings(path) if f.section == "vacuum_pipe gridpp"]
    assert texts(found) == [
        f"warning: {path}:8: [vacuum_pipe gridpp] vacuum_pipe_url: the last fetch of "
        "https://repo.example.com/gridpp.pipe failed at 2027-01-15 08:00:00 UTC: cannot fetch: connection "
        "refused; the cached copy from 2023-11-14 22:13:20 UTC stays in use"]


def test_a_pipe_machinetype_left_at_defaults_is_located_at_its_pipe_section(tmp_path):
    path = pipe_conf(tmp_path, cache=True)
    config = load(path)
    locator = predict.Locator(config, [path])
    assert locator.where("machinetype gridpp-dune", "max_wallclock_seconds") == (path, 7)


# --------------------------------------------------------------------------- online


def test_libvirt_test_driver_answers_and_a_typo_is_an_error_with_a_suggestion(tmp_path):
    path = conf(tmp_path, settings="libvirt_uri = test:///default")
    config = load(path)
    assert predict_online.libvirt(config, predict.Locator(config, [path])) == []
    path = conf(tmp_path, settings="libvirt_uri = test:///defualt")
    config = load(path)
    [found] = predict_online.libvirt(config, predict.Locator(config, [path]))
    assert (found.severity, found.line, found.option) == (predict.ERROR, 6, "libvirt_uri")
    assert found.message.startswith("test:///defualt does not answer: ")
    assert "(did you mean test:///default?)" in found.message




def test_ports_in_use_are_errors_and_free_ones_pass(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        udp.bind(("0.0.0.0", 0))
        metrics = free_port(socket.SOCK_STREAM)
        http_port = tcp.getsockname()[1]
        path = conf(tmp_path, settings=f"http_port = {http_port}\nudp_port = {udp.getsockname()[1]}\n"
                                       f"metrics_port = {metrics}\nsyslog_server =")
        config = load(path)
        found = predict_online.ports(config, predict.Locator(config, [path]))
    assert [(f.severity, f.option, f.line) for f in found] == [
        (predict.ERROR, "http_port", 6), (predict.ERROR, "udp_port", 7)]
    assert found[0].message == (f"TCP port {http_port} for the MJF and metadata HTTP server: "
                                "in use by another program: the daemon cannot serve it")


def test_ports_are_not_probed_while_the_daemon_of_this_state_dir_runs(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("0.0.0.0", 0))
        path = conf(tmp_path, settings=f"udp_port = {udp.getsockname()[1]}\nsyslog_server =")
        config = load(path)
        lock = StateLock(config.settings.state_dir)
        lock.acquire()
        try:
            found = predict_online.ports(config, predict.Locator(config, [path]))
        finally:
            lock.release()
    assert [(f.severity, f.option) for f in found] == [(predict.NOTE, "state_dir")]
    assert f"pid {os.getpid()}" in found[0].message


def test_unresolvable_hosts_pipe_without_cache_is_an_error_factory_a_warning(tmp_path):
    path = conf(tmp_path, settings="factories = . wn99.nosuch.invalid",
                machinetypes="[vacuum_pipe gridpp]\nvacuum_pipe_url = https://repo.nosuch.invalid/g.pipe\n")
    config = load(path)
    found = predict_online.host_names(config, predict.Locator(config, [path]), timeout=10)
    assert [(f.severity, f.option, f.line) for f in found] == [
        (predict.ERROR, "vacuum_pipe_url", 8), (predict.WARNING, "factories", 6)]
    assert found[0].message.startswith("repo.nosuch.invalid does not resolve (")
    assert found[0].message.endswith("the pipe is never fetched and defines no machinetypes")


# --------------------------------------------------------------------------- the command


def test_check_exits_78_on_predicted_errors_and_0_with_warnings_only(tmp_path, capsys):
    path = conf(tmp_path, machinetypes="[machinetype lhcb]\ntarget_share = 1\nroot_image = /nonexistent.iso\n")
    assert main(["--config", path, "config", "check", "--offline"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"error: {path}:9: [machinetype lhcb] root_image: /nonexistent.iso: no such file",
        "configuration valid, but 1 error will make the factory fail at run time (offline check: "
        "libvirt, ports and host names not tested)"]
    path = conf(tmp_path, machinetypes="[machinetype lhcb]\nroot_image = /nonexistent.iso\n")
    assert main(["--config", path, "config", "check", "--offline"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out.endswith("; 2 warnings; offline check\n")
    assert len(err.splitlines()) == 2 and all(line.startswith("warning: ") for line in err.splitlines())


def test_check_json_lists_findings_with_their_location(tmp_path, capsys):
    path = conf(tmp_path, settings="libvirt_uri = test:///defualt\nhttp_port = "
                                   f"{free_port(socket.SOCK_STREAM)}\nudp_port = {free_port(socket.SOCK_DGRAM)}\n"
                                   "syslog_server =",
                machinetypes="[machinetype lhcb]\ntarget_share = 1\nroot_image = /etc/hostname\n")
    assert main(["--config", path, "config", "check", "--json", "--online"]) == EXIT_CONFIG
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False and document["online"] is True
    [finding] = document["findings"]
    assert {k: finding[k] for k in ("severity", "source", "line", "section", "option")} == {
        "severity": "error", "source": path, "line": 6, "section": "settings", "option": "libvirt_uri"}
    assert document["errors"] == [finding["text"]]


def test_check_help_documents_the_exit_codes_and_online_default(capsys):
    with pytest.raises(SystemExit):
        main(["config", "check", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "warnings alone exit 0" in text and "78 when there are errors" in text
    assert "the default when run as root" in text


# --------------------------------------------------------------------------- qemu's view


def test_a_directory_qemu_cannot_search_is_an_error_for_qemu_system(tmp_path):
    """libvirt chowns images but not directories (hypervisor/disks.py): a 0700 directory above
    a root image or the state dir makes every domain start fail with Permission denied.
    The qemu user here owns the test's ancestors (they may be 0700); the image directory
    belongs to someone else."""
    images = tmp_path / "images"
    os.makedirs(images)
    write(images / "root.img", "raw")
    os.chown(images, 12345, 12345)
    os.chmod(images, 0o700)
    path = conf(tmp_path, settings="domain_type = kvm\nlibvirt_uri = qemu:///system\ntotal_processors = 1",
                machinetypes=f"[machinetype lhcb]\ntarget_share = 1\nroot_image = {images / 'root.img'}\n")
    path = write(path, open(path).read().replace("domain_type = test\n", ""))
    config = load(path)
    qemu = predict.QemuUser("libvirt-qemu", uid=os.geteuid(), gids=(54321,))
    found = predict.qemu_access(config, predict.Locator(config, [path]), qemu)
    assert texts(found) == [
        f"error: {path}:10: [machinetype lhcb] root_image: {images} (mode 0700) is not searchable by "
        f"libvirt-qemu: qemu cannot open {images / 'root.img'}; mode 0711 is enough"]
    os.chmod(images, 0o710)
    assert predict.qemu_access(config, predict.Locator(config, [path]),
                               predict.QemuUser("libvirt-qemu", os.geteuid(), (12345,))) == []
    assert predict.qemu_access(config, predict.Locator(config, [path]), None) == []


# --------------------------------------------------------------------------- servers the daemon runs


def test_nfs_machinetypes_need_the_exporters_program(tmp_path):
    """An empty directory as the search path stands for a host without ganesha."""
    path = conf(tmp_path, settings="nfs_exporter = ganesha",
                machinetypes="[machinetype lhcb]\ntarget_share = 1\nroot_image = /etc/hostname\nmjf_transport = nfs\n")
    config = load(path)
    assert texts(predict.nfs_server(config, predict.Locator(config, [path]), str(tmp_path / "empty"))) == [
        f"error: {path}:6: [settings] nfs_exporter: ganesha needs ganesha.nfsd, which is not installed: VMs of "
        "lhcb (mjf_transport = nfs) cannot be created"]
    program = write(tmp_path / "bin" / "ganesha.nfsd", "#!/bin/sh\n")
    os.chmod(program, 0o755)
    assert predict.nfs_server(config, predict.Locator(config, [path]), str(tmp_path / "bin")) == []


def test_apel_send_needs_its_certificate_key_and_cas(tmp_path):
    cert = write(tmp_path / "hostcert.pem", "a certificate")
    path = conf(tmp_path, settings=f"apel_send = yes\napel_broker_host = broker.example.org\n"
                                   f"apel_host_cert = {cert}\napel_host_key = {tmp_path / 'nokey.pem'}\n"
                                   f"apel_capath = {tmp_path / 'nocas'}")
    errors = [f for f in findings(path) if f.severity == predict.ERROR]
    assert [(f.option, f.line) for f in errors] == [("apel_host_key", 9), ("apel_capath", 10)]
    assert errors[0].message == f"{tmp_path / 'nokey.pem'}: no such file: apel_send cannot sign or connect; " \
                                "records wait in apel-outgoing"
