"""ConfigWatcher: re-read only on change, keep the last good configuration on a broken edit."""

from __future__ import annotations

import os

import pytest

from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, ConfigWatcher
from vacfactory.errors import ConfigErrors

HOST = HostFacts(fqdn="wn01.example.com", cpu_count=8, mem_total_mb=16384)


def write(path, text: str, bump: int = 0) -> str:
    """Write ``text``; ``bump`` moves the mtime forward so the change is seen whatever the clock tick."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    if bump:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))
    return path


def main_text(state, extra: str = "") -> str:
    return f"[settings]\nvac_space = vac01.example.com\nstate_dir = {state}\n{extra}"


@pytest.fixture
def setup(tmp_path):
    state = tmp_path / "state"
    main = write(tmp_path / "vacfactory.conf", main_text(state, "mb_per_processor = 1000\n"))
    watcher = ConfigWatcher(ConfigSources.for_main_file(main), host_facts=HOST)
    return tmp_path, state, main, watcher


def test_unchanged_files_are_not_parsed_again(setup):
    _, _, _, watcher = setup
    first = watcher.current
    results = [watcher.poll() for _ in range(5)]
    assert watcher.parse_count == 1
    assert all(r.config is first and not r.changed and r.errors is None for r in results)


def test_edit_is_picked_up_and_reported_as_changed(setup):
    _, state, main, watcher = setup
    write(main, main_text(state, "mb_per_processor = 3000\n"), bump=1)
    result = watcher.poll()
    assert (result.changed, result.errors, result.config.settings.mb_per_processor) == (True, None, 3000)
    assert watcher.current.settings.mb_per_processor == 3000
    assert watcher.parse_count == 2


def test_touch_without_content_change_rereads_but_is_not_a_change(setup):
    _, _, main, watcher = setup
    st = os.stat(main)
    os.utime(main, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    result = watcher.poll()
    assert watcher.parse_count == 2 and result.changed is False


def test_broken_edit_keeps_last_good_config_and_reports_errors_until_fixed(setup):
    _, state, main, watcher = setup
    good = watcher.current
    write(main, main_text(state, "mb_per_processor = lots\n"), bump=1)
    broken = watcher.poll()
    assert broken.config is good and broken.changed is False
    assert [str(e) for e in broken.errors.errors] == [
        f"{main}:4: [settings] mb_per_processor: 'lots' is not an integer"]
    again = watcher.poll()
    assert again.config is good and str(again.errors) == str(broken.errors)
    assert watcher.parse_count == 2  # still broken, but unchanged: not parsed again

    write(main, main_text(state, "mb_per_processor = 4000\n"), bump=2)
    fixed = watcher.poll()
    assert (fixed.changed, fixed.errors, fixed.config.settings.mb_per_processor) == (True, None, 4000)
    assert watcher.errors is None


def test_new_and_deleted_dropin_files_are_noticed(setup):
    tmp_path, _, _, watcher = setup
    dropin = write(tmp_path / "vacfactory.d" / "50-drain.conf", "[settings]\ndraining = yes\n")
    appeared = watcher.poll()
    assert appeared.changed and appeared.config.settings.draining is True
    os.unlink(dropin)
    vanished = watcher.poll()
    assert vanished.changed and vanished.config.settings.draining is False
    assert watcher.parse_count == 3


def test_runtime_override_appearing_is_noticed(setup):
    _, state, _, watcher = setup
    write(state / "runtime.conf", "[settings]\nshutdown_time = 1800000000\n")
    result = watcher.poll()
    assert result.changed and result.config.settings.shutdown_time == 1800000000


def test_first_load_raises_when_broken(tmp_path):
    main = write(tmp_path / "vacfactory.conf", main_text(tmp_path, "draining = perhaps\n"))
    with pytest.raises(ConfigErrors) as caught:
        ConfigWatcher(ConfigSources.for_main_file(main), host_facts=HOST)
    assert str(caught.value) == f"{main}:4: [settings] draining: 'perhaps' is not a boolean " \
                                "(use yes/no, true/false, on/off or 1/0)"
