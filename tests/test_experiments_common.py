"""The experiments' shared scaffold (median_sgd.experiments._common) and its use by every experiment."""

import dataclasses
import importlib
import inspect
import pickle

import pytest
import torch

from median_sgd._checks import ArgumentTypeError
from median_sgd.experiments import SCALES, Result
from median_sgd.experiments import _common as common

#: every experiment module with a config registry and a run()
EXPERIMENTS = ("aggregation_cost", "beyond", "bgmd_experiments", "bgmd_memory", "bgmd_theory",
               "bgmd_training", "gm_breakdown", "in_the_wild", "robust_mean", "sample_median_sgd",
               "scaling_out", "stable_noise", "tracking", "transformer_gradients")


@dataclasses.dataclass(frozen=True)
class Toy:
    n: int = 3
    tau: float = 0.5


@dataclasses.dataclass(frozen=True)
class Other:
    n: int = 3


def test_scales_need_one_config_type():
    configs = common.scales(ci=Toy(), paper=Toy(n=30))
    assert list(configs) == list(SCALES) == ["ci", "paper"]
    with pytest.raises(TypeError, match="one config type"):
        common.scales(ci=Toy(), paper=Other())


def test_resolve_config_takes_a_scale_name_or_a_config():
    configs = common.scales(ci=Toy(), paper=Toy(n=30))
    assert common.resolve_config("paper", configs) is configs["paper"]
    mine = Toy(n=7)
    assert common.resolve_config(mine, configs) is mine
    with pytest.raises(ValueError, match="unknown scale 'huge'; expected one of ci, paper"):
        common.resolve_config("huge", configs)
    with pytest.raises(TypeError, match="config must be a scale name or a Toy, got Other"):
        common.resolve_config(Other(), configs)


def test_check_fields_and_dtypes():
    common.check_fields(Toy(), ("n",), 1, integer=True)
    with pytest.raises(ValueError, match="n must be an integer >= 5"):
        common.check_fields(Toy(), ("n",), 5, integer=True)
    with pytest.raises(ArgumentTypeError, match="tau"):
        common.check_fields(Toy(tau="x"), ("tau",), 0, lo_open=True)
    common.check_each((1, 3), "sizes", 1, integer=True)
    for bad in ((), (1, 0), (1.5,), "13", None, (float("nan"),)):
        with pytest.raises(ValueError, match="sizes"):
            common.check_each(bad, "sizes", 1, integer=True)
    assert common.check_dtype(torch.float32) is torch.float32
    with pytest.raises(TypeError, match="dtype"):
        common.check_dtype(torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        common.check_dtype("float32")
    assert common.only_dtype(None) is torch.float32 and common.only_dtype(torch.float32) is torch.float32
    with pytest.raises(TypeError, match="dtype"):
        common.only_dtype(torch.float64)


def test_progress_is_a_no_op_unless_enabled():
    items = [1, 2, 3]
    assert common.progress(items) is items
    bar = common.progress(total=3)
    bar.update(1)
    bar.close()  # the disabled counter does nothing
    tqdm = pytest.importorskip("tqdm")
    shown = common.progress(items, enabled=True, desc="x", disable=True)
    assert isinstance(shown, tqdm.std.tqdm) and list(shown) == items


def test_thread_policy_restores_the_thread_count():
    before = torch.get_num_threads()
    seen = []

    @common.single_threaded_on_cpu
    def study(*, device="cpu"):
        seen.append(torch.get_num_threads())
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        study(device="cpu")
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ValueError):
        with common.cpu_threads(0):
            pass


def test_result_holds_named_tables():
    r = Result(Toy(), final=[{"a": 1}], curves=[], trace=torch.zeros(2))
    assert r.config == Toy() and r.final is r["final"] and list(r) == ["final", "curves", "trace"]
    assert len(r) == 3 and dict(r)["curves"] == [] and "final" in dir(r)
    assert "Toy" in repr(r) and "final=1" in repr(r)
    with pytest.raises(AttributeError, match="no table 'missing'; it has final, curves, trace"):
        _ = r.missing
    with pytest.raises(KeyError):
        r["missing"]
    with pytest.raises(AttributeError, match="read-only"):
        r.final = []
    again = pickle.loads(pickle.dumps(r))
    assert again.config == r.config and again.final == r.final
    assert common.records_of(Result(Toy(), records=[{"x": 1}])) == [{"x": 1}]
    assert common.records_of([{"x": 1}]) == [{"x": 1}]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_has_both_scales_and_the_common_run(name):
    module = importlib.import_module(f"median_sgd.experiments.{name}")
    assert list(module.CONFIGS) == list(SCALES)
    assert len({type(c) for c in module.CONFIGS.values()}) == 1
    params = inspect.signature(module.run).parameters
    first = next(iter(params.values()))
    assert first.name == "config" and first.default == "ci"
    for keyword in ("device", "dtype", "progress"):
        assert keyword in params and params[keyword].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["progress"].default is False
    with pytest.raises(ValueError, match="unknown scale"):
        module.run("huge")
