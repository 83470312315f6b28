"""core.mjf: HSF-TN-2016-02 keys plus Vac's legacy keys, values, and protected extras."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vacfactory.core.mjf import (
    JOBFEATURES_KEYS,
    LEGACY_JOBFEATURES_KEYS,
    LEGACY_MACHINEFEATURES_KEYS,
    MACHINEFEATURES_KEYS,
    MJFInput,
    NEWLINE_KEYS,
    format_hs06,
    jobfeatures,
    machinefeatures,
    shutdown_keys,
    valid_key,
)

START = 1_700_000_000
UUID = "3f0c5a8e-1d2b-4c3a-9e8f-0a1b2c3d4e5f"


def sample(**kw: Any) -> MJFInput:
    values: Dict[str, Any] = dict(
        job_id=UUID, processors=8, jobstart=START, shutdown_time=START + 86400,
        mb_per_processor=2048, hs06_per_processor=10.7, grace_seconds=30,
        scratch_bytes=40 * 10**9, max_swap_bytes=0,
    )
    values.update(kw)
    return MJFInput(**values)


def test_every_standard_and_legacy_key_is_present_when_hs06_is_set():
    inp = sample()
    assert set(machinefeatures(inp)) == set(MACHINEFEATURES_KEYS + LEGACY_MACHINEFEATURES_KEYS)
    assert set(jobfeatures(inp)) == set(JOBFEATURES_KEYS + LEGACY_JOBFEATURES_KEYS)


def test_hs06_keys_are_absent_when_hs06_per_processor_is_unset():
    inp = sample(hs06_per_processor=None)
    assert "hs06" not in machinefeatures(inp)
    assert "hs06_job" not in jobfeatures(inp)
    assert "total_cpu" in machinefeatures(inp) and "allocated_cpu" in jobfeatures(inp)


def test_machinefeatures_values():
    assert machinefeatures(sample()) == {
        "total_cpu": "8", "hs06": "85.6", "shutdowntime": str(START + 86400),
        "grace_secs": "30", "phys_cores": "8", "log_cores": "8", "jobslots": "1",
    }


def test_jobfeatures_arithmetic():
    job = jobfeatures(sample())
    assert job["allocated_cpu"] == job["allocated_CPU"] == "8\n"  # Vac's trailing newline
    assert job["hs06_job"] == "85.6"
    assert job["shutdowntime_job"] == str(START + 86400)
    assert job["grace_secs_job"] == "30"
    assert job["jobstart_secs"] == str(START)
    assert job["job_id"] == UUID
    assert job["wall_limit_secs"] == job["wall_limit_secs_lrms"] == "86400"
    assert job["cpu_limit_secs"] == job["cpu_limit_secs_lrms"] == str(86400 * 8)
    assert job["max_rss_bytes"] == str(2048 * 8 * 1048576)
    assert job["mem_limit_MB"] == str(2048 * 8 * 1048576 // 1000000)  # Vac's 1000**2 units
    assert job["max_swap_bytes"] == "0"
    assert job["scratch_limit_bytes"] == str(40 * 10**9)
    assert job["cpufactor_lrms"] == "1.0"


def test_wall_limit_is_never_negative():
    job = jobfeatures(sample(shutdown_time=START - 100))
    assert job["wall_limit_secs"] == "0" and job["cpu_limit_secs"] == "0"


def test_hs06_is_a_compact_float():
    assert format_hs06(10.7 * 8) == "85.6"
    assert format_hs06(10.0 * 8) == "80.0"
    assert format_hs06(0.1 + 0.2) == "0.3"
    assert machinefeatures(sample(hs06_per_processor=1 / 3, processors=3))["hs06"] == "1.0"


def test_extras_are_published_in_machinefeatures_only():
    inp = sample(extra_machinefeatures={"db12": "17.5", "site_note": "rack 4"})
    assert machinefeatures(inp)["db12"] == "17.5"
    assert machinefeatures(inp)["site_note"] == "rack 4"
    assert "db12" not in jobfeatures(inp)


@pytest.mark.parametrize("key", MACHINEFEATURES_KEYS + LEGACY_MACHINEFEATURES_KEYS)
def test_extras_cannot_override_a_standard_key(key):
    with pytest.raises(ValueError, match=key):
        sample(extra_machinefeatures={key: "999"})


def test_extra_keys_must_be_valid_and_values_one_line():
    with pytest.raises(ValueError, match="Bad-Key"):
        sample(extra_machinefeatures={"Bad-Key": "1"})
    with pytest.raises(ValueError, match="db12"):
        sample(extra_machinefeatures={"db12": "1\n2"})


def test_input_is_frozen_and_hashable_even_with_mapping_extras():
    a = sample(extra_machinefeatures={"b": "2", "a": "1"})
    b = sample(extra_machinefeatures=(("a", "1"), ("b", "2")))
    assert a == b and hash(a) == hash(b)
    assert a.extras == {"a": "1", "b": "2"}
    with pytest.raises(AttributeError):
        a.processors = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes",
    [
        {"job_id": ""}, {"job_id": "a\nb"}, {"job_id": " padded"}, {"processors": 0},
        {"mb_per_processor": -1}, {"scratch_bytes": -5}, {"hs06_per_processor": float("nan")},
        {"hs06_per_processor": -1.0}, {"grace_seconds": -1},
    ],
)
def test_bad_inputs_are_refused(changes):
    with pytest.raises(ValueError):
        sample(**changes)


def test_valid_key():
    assert valid_key("db12") and valid_key("a_b_9")
    assert not valid_key("") and not valid_key("A") and not valid_key("a-b")
    assert not valid_key("../x") and not valid_key("a\n")


def test_shutdown_keys_rewrite_only_the_dynamic_keys():
    machine, job = shutdown_keys(START + 500, 60)
    assert machine == {"shutdowntime": str(START + 500), "grace_secs": "60"}
    assert job == {"shutdowntime_job": str(START + 500), "grace_secs_job": "60"}
    full = sample(shutdown_time=START + 500, grace_seconds=60)
    assert machine.items() <= machinefeatures(full).items()
    assert job.items() <= jobfeatures(full).items()


_extras = st.dictionaries(
    st.from_regex(r"x[a-z0-9_]{0,10}", fullmatch=True),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
    max_size=3,
)
_inputs = st.builds(
    MJFInput,
    job_id=st.uuids().map(str),
    processors=st.integers(1, 256),
    jobstart=st.integers(0, 2**33),
    shutdown_time=st.integers(0, 2**33),
    mb_per_processor=st.integers(0, 10**6),
    hs06_per_processor=st.none() | st.floats(0, 1000, allow_nan=False),
    grace_seconds=st.integers(0, 10**6),
    scratch_bytes=st.integers(0, 10**15),
    max_swap_bytes=st.integers(0, 10**13),
    extra_machinefeatures=_extras,
)


@settings(max_examples=150, deadline=None)
@given(_inputs)
def test_no_value_has_a_newline_and_numbers_parse(inp):
    machine, job = machinefeatures(inp), jobfeatures(inp)
    for key, value in list(machine.items()) + list(job.items()):
        if key in NEWLINE_KEYS:  # Vac's one trailing newline, nothing else
            value = value[:-1] if value.endswith("\n") else "missing newline"
        assert "\n" not in value and "\r" not in value
    for key in ("total_cpu", "shutdowntime", "grace_secs"):
        assert int(machine[key]) >= 0
    wall = int(job["wall_limit_secs"])
    assert wall == max(0, inp.shutdown_time - inp.jobstart)
    assert int(job["cpu_limit_secs"]) == wall * inp.processors
    assert int(job["max_rss_bytes"]) == inp.mb_per_processor * inp.processors * 1048576
    if inp.hs06_per_processor is not None:
        assert abs(float(machine["hs06"]) - inp.hs06_per_processor * inp.processors) <= 0.00051
        assert machine["hs06"] == job["hs06_job"]


@settings(max_examples=100, deadline=None)
@given(_inputs, st.integers(1, 64))
def test_hs06_scales_with_processors(inp, processors):
    if inp.hs06_per_processor is None:
        inp = replace(inp, hs06_per_processor=10.0)
    changed = replace(inp, processors=processors)
    assert float(machinefeatures(changed)["hs06"]) == pytest.approx(
        inp.hs06_per_processor * processors, abs=0.00051
    )


def test_every_value_has_vacs_bytes_a_newline_only_after_allocated_cpu():
    """Vac 03.01's makeMJF: str(processors) + newline for allocated_cpu/allocated_CPU, and
    no newline after any other value."""
    inp = sample(extra_machinefeatures={"site_name": "UKI-Example"})
    values = {**machinefeatures(inp), **jobfeatures(inp)}
    for key, value in values.items():
        if key in NEWLINE_KEYS:
            assert value == "8\n", key
        else:
            assert "\n" not in value and value == value.strip() and value, key
    assert set(NEWLINE_KEYS) == {"allocated_cpu", "allocated_CPU"}
