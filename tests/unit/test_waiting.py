"""tests/waiting.py: waits return at the event, fail naming it, and stretch when the cores are busy."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from tests import waiting


@pytest.fixture(autouse=True)
def fresh_measurement(monkeypatch):
    """Every test measures the machine itself, with no floor from the environment."""
    monkeypatch.delenv("VACFACTORY_TEST_SLOWDOWN", raising=False)
    monkeypatch.setattr(waiting, "_measured", None)


def test_wait_for_returns_the_first_true_value_as_soon_as_the_event_happens(tmp_path):
    path = tmp_path / "appears"
    timer = threading.Timer(0.05, path.write_text, ("ready",))
    timer.start()
    try:
        assert waiting.wait_for(lambda: path.exists() and path.read_text(), "the file", 30) == "ready"
    finally:
        timer.cancel()


def test_wait_for_names_what_it_waited_for_and_shows_the_details():
    with pytest.raises(AssertionError) as failure:
        waiting.wait_for(lambda: 0, "the impossible", 0.05, interval=0.01, details=lambda: "log tail here")
    assert "waiting for the impossible" in str(failure.value) and "log tail here" in str(failure.value)


def test_poll_gives_the_last_false_value_at_the_deadline():
    calls = []
    assert waiting.poll(lambda: calls.append(1) or [], 0.05) == []
    assert len(calls) >= 2  # it polled, then gave up


def test_log_tail_is_the_end_of_the_file_or_says_why_not(tmp_path):
    log = tmp_path / "daemon.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert waiting.log_tail(str(log), 2)() == "line 98\nline 99\n"
    assert "No such file" in waiting.log_tail(str(tmp_path / "missing.log"))()


def test_the_environment_sets_a_floor_and_scaled_multiplies_by_the_factor(monkeypatch):
    monkeypatch.setenv("VACFACTORY_TEST_SLOWDOWN", "3")
    assert 3 <= waiting.slowdown() <= waiting.MAX_SLOWDOWN
    assert waiting.scaled(10) == pytest.approx(10 * waiting.slowdown())
    monkeypatch.setenv("VACFACTORY_TEST_SLOWDOWN", "100")
    assert waiting.slowdown() == waiting.MAX_SLOWDOWN  # a hang still ends
    monkeypatch.setenv("VACFACTORY_TEST_SLOWDOWN", "fast")
    assert waiting.slowdown() >= 1


def test_busy_cores_make_the_measured_slowdown_larger():
    hogs = [subprocess.Popen([sys.executable, "-S", "-c", "print('spinning', flush=True)\nwhile 1: pass"],
                             stdout=subprocess.PIPE, text=True) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        for hog in hogs:
            assert hog.stdout.readline() == "spinning\n"
        # two busy loops per core: a spinning thread gets about a third of a core or less
        assert waiting.slowdown() > 1.5
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
            hog.stdout.close()
