"""The benchmark harness names the machine in words: "1 thread", "2 threads"."""

from __future__ import annotations

import os

import torch

from benchmarks._harness import counted, device_name, measure_interleaved, pair_ratios


def test_counted_is_singular_for_one():
    assert counted(1, "thread") == "1 thread"
    assert counted(2, "thread") == "2 threads"
    assert counted(0, "core") == "0 cores"


def test_cpu_device_name_says_one_thread(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert device_name(torch.device("cpu")).endswith(f"({counted(os.cpu_count(), 'core')}, 1 thread)")


def test_interleaved_samples_come_in_rounds_and_pair_ratios_are_their_quartiles():
    clock = iter(range(100))  # every read of the clock one second later
    ticks = []

    def slow():  # reads the clock twice more: 3 seconds per timed call, 1 for fast
        ticks.append(next(clock))
        ticks.append(next(clock))

    a, b = measure_interleaved([slow, lambda: None], torch.device("cpu"), warmup=1, repeat=5,
                               clock=lambda: float(next(clock)))
    assert a["samples_s"] == [3.0] * 5 and b["samples_s"] == [1.0] * 5
    spread = pair_ratios(a, b)
    assert spread == {"pair_ratio_q1": 3.0, "pair_ratio_median": 3.0, "pair_ratio_q3": 3.0}
    varied = pair_ratios({"samples_s": [1.0, 2.0, 3.0, 4.0, 5.0]}, {"samples_s": [1.0] * 5})
    assert varied == {"pair_ratio_q1": 2.0, "pair_ratio_median": 3.0, "pair_ratio_q3": 4.0}
