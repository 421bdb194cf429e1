"""The benchmark harness names the machine in words: "1 thread", "2 threads"."""

from __future__ import annotations

import os

import torch

from benchmarks._harness import counted, device_name


def test_counted_is_singular_for_one():
    assert counted(1, "thread") == "1 thread"
    assert counted(2, "thread") == "2 threads"
    assert counted(0, "core") == "0 cores"


def test_cpu_device_name_says_one_thread(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert device_name(torch.device("cpu")).endswith(f"({counted(os.cpu_count(), 'core')}, 1 thread)")
