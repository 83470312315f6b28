"""engine.rebalance in the engine on libvirt's test driver: graceful rebalancing publishes an
earlier MJF shutdown time in excess VMs (as a drain does), and nothing at all by default."""

from __future__ import annotations

import os

from tests.unit.engine_harness import kernel_file, machinetype_text, make_harness, settings_text


def build(tmp_path, settings, shares):
    kernel = kernel_file(str(tmp_path))
    text = settings_text(f"r{os.getpid()}.example.org", str(tmp_path / "state"), 8, settings)
    for name, share in shares:
        text += machinetype_text(name, kernel, share, "max_wallclock_seconds = 86400")
    return make_harness(str(tmp_path), text), kernel


def shutdowntimes(h):
    found = {}
    for vm in h.live():
        with open(os.path.join(vm.path, "jobfeatures", "shutdowntime_job")) as f:
            job = int(f.read())
        with open(os.path.join(vm.path, "machinefeatures", "shutdowntime")) as f:
            assert int(f.read()) == job
        found[vm.uuid] = job
    return found


def test_a_share_change_gives_notice_to_the_excess_vms_only_when_rebalance_is_on(tmp_path):
    h, kernel = build(tmp_path, "rebalance = yes\nrebalance_max_percent = 50\n",
                      (("alpha", 1), ("beta", 0)))
    try:
        assert len(h.factory.run_round().created) == 8  # all alpha: beta has no share
        before = shutdowntimes(h)
        # beta gets a share: alpha is 50 points over, beta waits with work (never aborted)
        text = open(h.config_path).read().replace(
            "[machinetype beta]\ntarget_share = 0", "[machinetype beta]\ntarget_share = 1")
        h.rewrite_config(text)
        h.clock.advance(60)
        h.factory.run_round()
        after = shutdowntimes(h)
        moved = {u for u in after if after[u] != before[u]}
        assert len(moved) == 4  # alpha is 4 over its target of 4 (also the 50 % budget)
        assert {after[u] for u in moved} == {int(h.clock.now) + 3600}
        assert all(after[u] == before[u] for u in after if u not in moved)
        # the next round moves nothing more: those VMs are under notice already
        h.clock.advance(60)
        h.factory.run_round()
        assert shutdowntimes(h) == after
        # a noticed VM that stops is replaced by beta, the machinetype that waited
        vm = next(m for m in h.live() if m.uuid in moved)
        h.power_off(vm, "100 Shutdown as requested")
        report = h.factory.run_round()
        assert len(report.created) == 1
        (new,) = [m for m in h.live() if m.name == report.created[0]]
        assert new.record.machinetype == "beta"
    finally:
        h.teardown()


def test_without_the_option_no_shutdown_time_moves(tmp_path):
    h, _ = build(tmp_path, "", (("alpha", 1), ("beta", 0)))
    try:
        h.factory.run_round()
        before = shutdowntimes(h)
        h.rewrite_config(open(h.config_path).read().replace(
            "[machinetype beta]\ntarget_share = 0", "[machinetype beta]\ntarget_share = 1"))
        h.clock.advance(60)
        h.factory.run_round()
        assert shutdowntimes(h) == before
    finally:
        h.teardown()


def test_adaptive_backoff_in_the_engine_remembers_each_abort_of_its_own_probes(tmp_path):
    h, _ = build(tmp_path, "adaptive_backoff = yes\n", (("alpha", 1),))
    try:
        h.factory.run_round()
        first, second = h.live()[:2]
        h.power_off(first, "300 Nothing to do")
        assert h.factory.run_round().created == []  # backoff_seconds = 300 (the harness's)
        h.clock.advance(301)
        probe = h.factory.run_round().created
        assert len(probe) == 1  # one abort: the wait is backoff_seconds, as in Vac
        (probe_vm,) = [m for m in h.live() if m.name == probe[0]]
        h.power_off(probe_vm, "300 Nothing to do")  # this factory's latest finish again
        h.factory.run_round()
        h.clock.advance(301)
        # two aborts remembered (VacQuery would show only the latest): the wait doubled
        report = h.factory.run_round()
        assert report.created == []
        assert "alpha backing off until" in report.decision.reason
        h.clock.advance(300)
        assert len(h.factory.run_round().created) == 1
    finally:
        h.teardown()


def test_a_vac_sites_file_schedules_as_vac_unless_it_turns_the_options_on(tmp_path):
    from vacfactory.config import loader
    from vacfactory.engine import policies

    path = tmp_path / "vac.conf"
    base = ("[settings]\nvac_space = space.example.ac.uk\nfactory_name = here.example.ac.uk\n"
            "total_processors = 4\ndomain_type = test\n{extra}\n"
            "[machinetype atlas]\ntarget_share = 3\nroot_image = /tmp/none.img\n")
    path.write_text(base.format(extra=""))
    config = loader.load_config(loader.ConfigSources.for_main_file(str(path), vac=True))
    assert not config.settings.rebalance
    assert policies.factory_policy(config, 4).adaptive_backoff is None
    path.write_text(base.format(extra="adaptive_backoff = yes\nadaptive_backoff_max_seconds = 900"))
    config = loader.load_config(loader.ConfigSources.for_main_file(str(path), vac=True))
    assert policies.factory_policy(config, 4).adaptive_backoff.max_seconds == 900
