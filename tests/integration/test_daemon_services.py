"""The daemon's side services, in a real `vacfactory run` process on libvirt's test driver:
/metrics (parsed with prometheus_client), the VacQuery responder (asked by the CLI over UDP),
and VacMon datagrams to a real UDP receiver.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ports import free_port
from tests.waiting import log_tail, scaled, wait_for

pytestmark = pytest.mark.integration

VACFACTORY = os.path.join(os.path.dirname(sys.executable), "vacfactory")




@pytest.fixture
def daemon(tmp_path):
    metrics_port = free_port(socket.SOCK_STREAM)
    udp_port = free_port(socket.SOCK_DGRAM)
    vacmon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    vacmon.bind(("127.0.0.1", 0))
    vacmon.settimeout(scaled(20))
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"not a kernel: the test driver boots nothing")
    config = tmp_path / "vacfactory.conf"
    config.write_text(textwrap.dedent(f"""\
        [settings]
        vac_space = space.example.org
        factory_name = vfsvc{os.getpid()}.example.org
        factories = .
        state_dir = {tmp_path}/state
        libvirt_uri = test:///default
        domain_type = test
        total_processors = 3
        overload_per_processor = 100000
        hs06_per_processor = 10
        udp_port = {udp_port}
        nfs_exporter = none
        metrics_port = {metrics_port}
        vacmon_hostport = 127.0.0.1:{vacmon.getsockname()[1]}

        [machinetype alpha]
        target_share = 1
        machine_model = vm-raw
        kernel_image = {kernel}
        """))
    log_path = str(tmp_path / "daemon.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen([VACFACTORY, "--config", str(config), "run"], stdout=log, stderr=subprocess.STDOUT)
    yield process, str(config), metrics_port, vacmon, log_path
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=scaled(30))
    vacmon.close()


def samples_with_three_alpha_vms(port: int) -> dict:
    """The endpoint's samples once they show 3 running alpha VMs; {} before (or not listening yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=scaled(2)) as response:
            text = response.read().decode()
    except OSError:
        return {}
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples if samples.get(("vacfactory_running_vms", (("machinetype", "alpha"),))) == 3 else {}


def scrape(port: int, log_path: str) -> dict:
    return wait_for(lambda: samples_with_three_alpha_vms(port), "the metrics endpoint to show 3 running alpha VMs",
                    20, interval=0.5, details=log_tail(log_path))


def test_metrics_endpoint_shows_the_running_vms(daemon):
    _, _, metrics_port, _, log_path = daemon
    samples = scrape(metrics_port, log_path)
    assert samples[("vacfactory_running_processors", (("machinetype", "alpha"),))] == 3
    assert samples[("vacfactory_total_processors", ())] == 3
    assert samples[("vacfactory_creations_total", (("machinetype", "alpha"),))] == 3
    assert samples[("vacfactory_hypervisor_reachable", ())] == 1


def test_responder_answers_the_cli_over_udp(daemon):
    _, config, metrics_port, _, log_path = daemon
    scrape(metrics_port, log_path)  # the VMs exist
    result = subprocess.run([VACFACTORY, "--config", config, "machinetypes", "--json"],
                            capture_output=True, text=True, timeout=scaled(30))
    assert result.returncode == 0, result.stderr
    replies = json.loads(result.stdout)
    (alpha,) = [r for r in replies if r.get("machinetype") == "alpha"]
    assert alpha["running_machines"] == 3 and alpha["running_hs06"] == 30.0


def test_vacmon_receives_factory_and_machinetype_status(daemon):
    _, _, _, vacmon, _ = daemon
    seen = set()
    deadline = time.monotonic() + scaled(20)
    while {"factory_status", "machinetype_status"} - seen and time.monotonic() < deadline:
        data, _ = vacmon.recvfrom(65536)
        seen.add(json.loads(data)["message_type"])
    assert {"factory_status", "machinetype_status"} <= seen
