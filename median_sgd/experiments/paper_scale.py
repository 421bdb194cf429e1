"""Run one experiment at the papers' scale (or a reduced copy of it) and write its records as JSON.

``python -m median_sgd.experiments.paper_scale EXPERIMENT [--set FIELD=VALUE ...] [--device D]
[--out DIR]`` runs ``median_sgd.experiments.<EXPERIMENT>.run(config, device=D)`` with the
experiment's ``CONFIGS["paper"]``, changed by each ``--set`` (``dataclasses.replace``; a tuple
field takes comma-separated values), and writes ``DIR/<EXPERIMENT>-<label>-<device type>.json``:
the config as run, which of its fields differ from the paper scale, the device (its name), the
wall time, the torch version, and every table of the :class:`~median_sgd.experiments._common.Result`
that is a list of records (tensors as lists; other tables are named but not written).

The paper-scale data come through downloaders (right for Colab); where a machine has no network,
``--set`` can point an experiment at the data that ship offline, and the label says so. Examples::

    # chapter 7 at the paper's model size (d_model = d_hid = 200, 2 layers, segments of 35
    # tokens, batch sizes 64/256/1024, 1000 iterations, 3 seeds) on the offline corpora
    python -m median_sgd.experiments.paper_scale transformer_gradients \\
        --set corpora=pydoc,docstrings --label offline-corpora --device cuda
    # the same, reduced to a CPU smoke run
    python -m median_sgd.experiments.paper_scale transformer_gradients \\
        --set corpora=pydoc --set iterations=5 --set seeds=1 --set batch_sizes=64 --label reduced
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["paper_config", "run_paper_scale", "main"]

#: where the records go by default (next to the benchmark results)
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "paper-scale"


def _parse_value(text: str, current: Any) -> Any:
    """``text`` as a value of the kind of ``current`` (a tuple: comma-separated elements)."""
    if isinstance(current, tuple):
        kind = type(current[0]) if current else str
        return tuple(_parse_value(t.strip(), kind()) for t in text.split(",") if t.strip())
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if current is None:
        return None if text.lower() == "none" else text
    return type(current)(text)


def paper_config(experiment: str, settings: Sequence[str] = ()) -> Any:
    """The experiment's ``CONFIGS["paper"]`` with each ``"field=value"`` of ``settings`` applied."""
    module = importlib.import_module(f"median_sgd.experiments.{experiment}")
    config = module.CONFIGS["paper"]
    changes: Dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(config)}
    for item in settings:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set needs FIELD=VALUE with FIELD one of {sorted(fields)}, got {item!r}")
        changes[name] = _parse_value(text, getattr(config, name))
    return dataclasses.replace(config, **changes)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) or value is None or isinstance(value, (int, str, bool)):
        return value
    return repr(value)


def run_paper_scale(experiment: str, settings: Sequence[str] = (), *, device: str = "cpu",
                    label: str = "paper", out: Optional[Path] = None) -> Path:
    """Run ``experiment`` at :func:`paper_config` on ``device`` and write its records; the path."""
    module = importlib.import_module(f"median_sgd.experiments.{experiment}")
    config = paper_config(experiment, settings)
    paper = module.CONFIGS["paper"]
    dev = torch.device(device)
    start = time.perf_counter()
    result = module.run(config, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    tables = {name: table for name, table in result.items()
              if isinstance(table, list) and all(isinstance(r, dict) for r in table)}
    payload = {
        "experiment": experiment,
        "label": label,
        "config": _jsonable(dataclasses.asdict(config)),
        "differs_from_paper_scale": {f.name: _jsonable(getattr(config, f.name))
                                     for f in dataclasses.fields(config)
                                     if getattr(config, f.name) != getattr(paper, f.name)},
        "device": _device_name(dev),
        "device_type": dev.type,
        "seconds": seconds,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tables_not_written": sorted(set(result) - set(tables)),
        "tables": _jsonable(tables),
    }
    out = Path(out) if out is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{experiment}-{label}-{dev.type}.json"
    path.write_text(json.dumps(payload) + "\n")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m median_sgd.experiments.paper_scale",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="a module of median_sgd.experiments with CONFIGS and run()")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one field of the paper config (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--label", default="paper", help="names the run in the file name and JSON")
    parser.add_argument("--out", type=Path, default=None, help=f"folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        path = run_paper_scale(args.experiment, args.settings, device=args.device,
                               label=args.label, out=args.out)
    except (ValueError, ModuleNotFoundError) as err:
        parser.error(str(err))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover - the command line
    raise SystemExit(main())
