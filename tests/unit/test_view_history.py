"""The status page's time series: bounded on disk, crash-safe under kill -9, kept over a
restart, pruned after a week, and a broken or hostile file costs only its own hour."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

from vacfactory.view.history import (
    HOUR_SECONDS,
    KEEP_HOURS,
    MAX_CODES,
    MAX_NAME,
    PAGE_HOURS,
    POINT_SECONDS,
    WEEK_BYTES_PER_MACHINETYPE,
    HistoryStore,
    Sample,
)

T0 = 1_900_000_800  # a minute boundary, mid-hour
NOW = T0 + 3 * HOUR_SECONDS  # when a store is (re)started, unless a test says otherwise


def worst_sample() -> Sample:
    """Every field at its longest: long floats, big counts, more codes than are kept."""
    return Sample(target_share=0.123456789, share=0.987654321, space_share=0.555555555, started=65535,
                  backoff=1, cpu_efficiency=0.999999999, running_processors=65535,
                  outcomes={str(code): 65535 for code in range(100, 100 + 3 * MAX_CODES)})


def test_a_week_of_worst_case_points_stays_under_the_documented_size(tmp_path):
    store = HistoryStore(str(tmp_path), now=NOW, sync=False)
    name = "m" * MAX_NAME
    hour = T0 - T0 % HOUR_SECONDS
    for minute in range(60):  # one full hour: the largest a file gets
        store.add(hour + minute * POINT_SECONDS, {name: worst_sample()})
    (only,) = os.listdir(tmp_path)
    full_hour = os.path.getsize(tmp_path / only)
    # at most KEEP_HOURS + 1 files exist (checked below): a week is bounded by that many full hours
    assert full_hour * (KEEP_HOURS + 1) < WEEK_BYTES_PER_MACHINETYPE
    point = store.points[-1][1][name]
    assert len(point.outcomes) == MAX_CODES + 1 and point.outcomes["other"] == 2 * MAX_CODES * 65535


def test_files_older_than_a_week_are_deleted_and_the_page_keeps_a_day(tmp_path):
    store = HistoryStore(str(tmp_path), now=NOW, sync=False)
    for hour in range(KEEP_HOURS + 30):  # one point an hour over eight days
        store.add(T0 + hour * HOUR_SECONDS, {"atlas": Sample(started=hour)})
    assert len(os.listdir(tmp_path)) == KEEP_HOURS
    newest = T0 + (KEEP_HOURS + 29) * HOUR_SECONDS
    assert min(int(n.split(".")[0]) for n in os.listdir(tmp_path)) > newest - KEEP_HOURS * HOUR_SECONDS
    assert len(store.points) == PAGE_HOURS
    series = store.series(newest - PAGE_HOURS * HOUR_SECONDS)["atlas"]
    assert series["started"][-1] == KEEP_HOURS + 29 and len(series["time"]) == PAGE_HOURS


def test_a_restart_keeps_the_last_day_and_the_same_minute_is_replaced(tmp_path):
    store = HistoryStore(str(tmp_path), now=NOW)
    for minute in range(5):
        store.add(T0 + minute * POINT_SECONDS, {"atlas": Sample(share=minute / 10, outcomes={"300": minute})})
    store.add(T0 + 4 * POINT_SECONDS + 30, {"atlas": Sample(share=0.9), "<script>x</script>": Sample(started=1)})
    again = HistoryStore(str(tmp_path), now=NOW)
    series = again.series(T0 - 1)
    assert series["atlas"]["share"] == [0.0, 0.1, 0.2, 0.3, 0.9]
    assert series["atlas"]["outcomes"][:4] == [{}, {"300": 1}, {"300": 2}, {"300": 3}]
    assert series["<script>x</script>"]["started"] == [1]
    # the restarted store goes on in the same hour's file
    again.add(T0 + 5 * POINT_SECONDS, {"atlas": Sample(share=1.0)})
    assert HistoryStore(str(tmp_path), now=NOW).series(T0 - 1)["atlas"]["share"][-1] == 1.0
    assert len(os.listdir(tmp_path)) == 1


def test_a_broken_or_hostile_file_is_skipped_with_its_name_and_the_rest_is_read(tmp_path, caplog):
    store = HistoryStore(str(tmp_path), now=NOW, sync=False)
    store.add(T0, {"atlas": Sample(share=0.5)})
    store.add(T0 + HOUR_SECONDS, {"atlas": Sample(share=0.6)})
    hours = sorted(os.listdir(tmp_path))
    (tmp_path / hours[0]).write_text('{"format": 1, "points": [[1, {"atlas": ["x", 0, 0, 0, 0, 0, 0, {}]}]]}')
    garbage = f"{T0 - T0 % HOUR_SECONDS - HOUR_SECONDS}.json"
    (tmp_path / garbage).write_bytes(b"\xff\x00 not json")
    (tmp_path / "9999999999.json").write_bytes(b"from the future (a clock stepped back): not read")
    (tmp_path / "notes.txt").write_text("ignored: not an hour file")
    with caplog.at_level(logging.WARNING, logger="vacfactory.view.history"):
        again = HistoryStore(str(tmp_path), now=NOW)
    assert again.series(0)["atlas"]["share"] == [0.6]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert hours[0] in messages and garbage in messages and "9999999999" not in messages
    assert "points[0].atlas" in messages


WRITER = """
import sys, time
from vacfactory.view.history import HistoryStore, Sample
store = HistoryStore(sys.argv[1], sync=False, now=int(sys.argv[2]))
t = int(sys.argv[2])
names = {f"mt{i}": Sample(share=i / 10, started=i, outcomes={"200": i}) for i in range(20)}
n = 0
while True:
    store.add(t + n * 60, names)
    n += 1
    print(n, flush=True)
"""


def test_kill_9_while_writing_leaves_every_file_whole_and_every_reported_point(tmp_path):
    """A writer adds a point a minute (of simulated time) as fast as it can (atomic renames
    without fsync: a kill, unlike a power cut, cannot lose what was renamed); it is killed -9
    at arbitrary instants. After each kill every file parses and every point the writer had
    reported written is there; the next writer goes on from it."""
    start = T0
    for trial in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(start)],
                                  stdout=subprocess.PIPE, text=True,
                                  cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        written = 0
        deadline = time.monotonic() + 20
        assert writer.stdout is not None
        while written < 40 + 17 * trial and time.monotonic() < deadline:
            written = int(writer.stdout.readline())
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        assert written >= 40
        for name in os.listdir(tmp_path):
            if not name.startswith("."):  # a temporary file the kill left: removed at start
                with open(tmp_path / name) as f:
                    json.load(f)
        store = HistoryStore(str(tmp_path), now=start + 200 * 60)
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
        minutes = [m for m, _ in store.points if m >= start]
        assert minutes[:written] == [start + 60 * n for n in range(written)]
        assert store.points[-1][1]["mt7"].share == 0.7
        start = minutes[-1] + 60
