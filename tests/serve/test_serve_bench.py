"""The serving benchmark's ceilings (bench/serve_throughput.py): the arithmetic its ``ratio_of_ceiling`` rests on."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve_throughput.py"
COSTS = {"p1": 0.224, "pB": 1.002, "d1": 0.067, "dB": 0.161}  # seconds, as measured here for 8 clients


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equal_answers_in_full_waves_reach_the_full_batch_ceiling(bench):
    full = bench.ceiling(COSTS, 8, 46)["ceiling"]
    for requests in (8, 32):
        assert bench.schedule_ceiling(COSTS, 8, 48, [(48, 46)] * requests) == pytest.approx(full, rel=0.01)


def test_unequal_answers_and_a_last_partial_wave_lower_the_ceiling(bench):
    full = bench.schedule_ceiling(COSTS, 8, 48, [(48, 40)] * 32)
    unequal = bench.schedule_ceiling(COSTS, 8, 48, [(48, 10), (48, 70)] * 16)  # same tokens, unequal answers
    partial = bench.schedule_ceiling(COSTS, 8, 48, [(48, 40)] * 33)  # one request alone at the end
    assert unequal < full and partial < full


def test_a_lone_request_has_nothing_to_share(bench):
    assert bench.schedule_ceiling(COSTS, 8, 48, [(48, 30)]) == pytest.approx(1.0)
