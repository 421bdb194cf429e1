"""Timing helpers shared by the benchmark suites: warm-up, repetitions, medians, device sync."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so a timer measures work, not launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeat: int = 7,
            min_time: float = 0.0) -> dict:
    """Median (and min, max) seconds of ``fn()`` over ``repeat`` timed calls after ``warmup`` calls.

    With ``min_time > 0`` each timed sample loops ``fn`` until it has run that long and reports the
    time per call, so sub-millisecond calls are not dominated by timer resolution.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeat):
        calls = 0
        start = time.perf_counter()
        while True:
            fn()
            calls += 1
            if min_time <= 0.0:
                break
            synchronize(device)
            if time.perf_counter() - start >= min_time:
                break
        synchronize(device)
        samples.append((time.perf_counter() - start) / calls)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "repeat": repeat}


def measure_interleaved(fns: Sequence[Callable[[], object]], device: torch.device, *, warmup: int = 2,
                        repeat: int = 7, clock: Callable[[], float] = time.perf_counter) -> List[dict]:
    """:func:`measure` of several functions with their repetitions interleaved.

    On a shared machine the load drifts; alternating the timed calls exposes all of them to the
    same drift, so their ratios are steadier than those of separate series. ``clock`` reads the
    time (default: wall-clock; ``time.process_time``, the process's CPU time, leaves out the
    time other processes hold the cores, on the CPU with one thread). Each result also has its
    ``samples_s`` (in order: ``samples_s[r]`` of every function come from the same round ``r``).
    """
    for _ in range(warmup):
        for f in fns:
            f()
    synchronize(device)
    samples = [[] for _ in fns]
    for _ in range(repeat):
        for f, out in zip(fns, samples):
            start = clock()
            f()
            synchronize(device)
            out.append(clock() - start)
    return [{"median_s": statistics.median(x), "min_s": min(x), "max_s": max(x), "repeat": repeat,
             "samples_s": x} for x in samples]


def measure_pair(reference: Callable[[], object], fn: Callable[[], object], device: torch.device, *,
                 warmup: int = 2, repeat: int = 7) -> tuple:
    """``(reference, fn)`` timings by :func:`measure_interleaved`."""
    return tuple(measure_interleaved([reference, fn], device, warmup=warmup, repeat=repeat))


def pair_ratios(reference: dict, timed: dict) -> dict:
    """The spread of ``reference / timed`` over the rounds of :func:`measure_interleaved` (each
    ratio of two calls timed one right after the other): median and quartiles."""
    ratios = [a / b for a, b in zip(reference["samples_s"], timed["samples_s"])]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"pair_ratio_q1": q1, "pair_ratio_median": median, "pair_ratio_q3": q3}


def device_name(device: torch.device) -> str:
    """A human-readable name of the device the numbers were measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores, threads = counted(os.cpu_count(), "core"), counted(torch.get_num_threads(), "thread")
    return f"{cpu_model()} ({cores}, {threads})"


def counted(k: Optional[int], noun: str) -> str:
    """``k`` and ``noun``, plural unless ``k`` is 1: ``"1 thread"``, ``"2 threads"``."""
    return f"{k} {noun}{'' if k == 1 else 's'}"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where the OS has none): timings taken on a
    busy machine are slower, and the results record how busy it was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def print_table(title: str, rows: List[dict], columns: Iterable[str]) -> None:
    """A plain-text table of ``rows`` restricted to ``columns`` (floats to 3 significant digits)."""
    columns = list(columns)

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_results(suite: str, rows: List[dict], device: torch.device,
                  path: Optional[Path] = None) -> Path:
    """Write ``rows`` with the machine's description to ``results/<suite>-<device type>.json``."""
    path = path or RESULTS / f"{suite}-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "suite": suite,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
