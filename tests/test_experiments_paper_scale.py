"""The paper-scale runner: configs from --set, the JSON it writes (a tiny reduced run)."""

from __future__ import annotations

import json

import pytest

from median_sgd.experiments import paper_scale, robust_mean, transformer_gradients


def test_paper_config_applies_each_setting_with_the_fields_kind():
    cfg = paper_scale.paper_config("transformer_gradients",
                                   ["corpora=pydoc,docstrings", "iterations=7", "batch_sizes=8,16",
                                    "headline_tau=0.1"])
    paper = transformer_gradients.CONFIGS["paper"]
    assert cfg.corpora == ("pydoc", "docstrings") and cfg.iterations == 7
    assert cfg.batch_sizes == (8, 16) and cfg.headline_tau == 0.1
    assert cfg.d_model == paper.d_model == 200 and cfg.seq_len == paper.seq_len == 35
    assert paper.iterations == 1000  # the paper config itself is not changed


@pytest.mark.parametrize("bad", ["iterations", "nonsense=3", "iterations=seven"])
def test_paper_config_refuses_bad_settings(bad):
    with pytest.raises(ValueError):
        paper_scale.paper_config("transformer_gradients", [bad])


def test_run_paper_scale_writes_the_records_with_device_time_and_differences(tmp_path):
    settings = ["seeds=3", "sample_sizes=5,11", "tail_alphas=2.0,1.0", "breakdown_n=20",
                "breakdown_seeds=2", "breakdown_fractions=0.0,0.3", "scene_inliers=20"]
    path = paper_scale.run_paper_scale("robust_mean", settings, label="reduced", out=tmp_path)
    assert path == tmp_path / "robust_mean-reduced-cpu.json"
    data = json.loads(path.read_text())
    assert data["experiment"] == "robust_mean" and data["device_type"] == "cpu"
    assert data["seconds"] > 0 and "threads" in data["device"]
    assert data["differs_from_paper_scale"]["seeds"] == 3
    assert "dim" not in data["differs_from_paper_scale"]  # unchanged fields are not listed
    assert data["config"]["dim"] == robust_mean.CONFIGS["paper"].dim
    assert {"sample_size", "tails", "breakdown"} <= set(data["tables"])
    assert len(data["tables"]["sample_size"]) > 0
    assert "scene" in data["tables_not_written"]  # a dict, not a list of records


def test_main_reports_a_bad_experiment_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        paper_scale.main(["no_such_experiment"])
    assert info.value.code == 2


def test_nested_settings_and_run_arguments():
    from median_sgd.experiments import bgmd_experiments

    cfg = paper_scale.paper_config("bgmd_experiments", ["table2.dataset=mnist_5k",
                                                        "table2.seeds=0,1", "table2.epochs=2"])
    paper = bgmd_experiments.CONFIGS["paper"]
    assert cfg.table2.dataset == "mnist_5k" and cfg.table2.seeds == (0, 1)
    assert cfg.table2.epochs == 2.0 and cfg.table2.clients == paper.table2.clients == 32
    assert cfg.table3 == paper.table3
    kwargs = paper_scale.run_arguments("bgmd_experiments", ["experiments=table2", "max_runs=4",
                                                            "batched=false"])
    assert kwargs == {"experiments": ("table2",), "max_runs": 4, "batched": False}
    for bad in (["table2=3"], ["table2.nonsense=1"], ["table2.methods=SGD"], ["table2.epochs.x=1"]):
        with pytest.raises(ValueError):
            paper_scale.paper_config("bgmd_experiments", bad)
    # a parameter whose default is None: None, true/false, numbers, else the text
    assert [paper_scale._parse_value(t, None) for t in ("None", "false", "True", "3", "0.5", "x")] \
        == [None, False, True, 3, 0.5, "x"]
    for bad in (["device=cuda"], ["nonsense=1"], ["experiments"]):
        with pytest.raises(ValueError):
            paper_scale.run_arguments("bgmd_experiments", bad)


def test_a_reduced_table2_run_writes_seeds_and_nested_differences(tmp_path):
    settings = ["table2.dataset=digits", "table2.model=tiny_cnn", "table2.clients=4",
                "table2.batch_size=8", "table2.epochs=0.05", "table2.seeds=0,1",
                "table2.psis=0.0,0.2", "table2.attacks=bit_flip", "table2.eval_every=1"]
    path = paper_scale.run_paper_scale("bgmd_experiments", settings, label="tiny", out=tmp_path,
                                       arguments=["experiments=table2"])
    data = json.loads(path.read_text())
    assert data["run_arguments"] == {"experiments": ["table2"]}
    assert data["differs_from_paper_scale"]["table2.clients"] == 4
    assert "table2.lr" not in data["differs_from_paper_scale"] and "table3" not in str(
        data["differs_from_paper_scale"])
    records = data["tables"]["records"]
    assert {r["experiment"] for r in records} == {"table2"}
    assert {r["seed"] for r in records} == {0, 1}
    assert {(r["attack"], r["psi"]) for r in records} == {("none", 0.0), ("bit_flip", 0.2)}
    assert {r["method"] for r in records} == {"SGD", "CmD", "BGmD", "GmD"}


def test_committed_runs_reads_what_run_paper_scale_wrote(tmp_path):
    assert paper_scale.committed_runs("robust_mean", tmp_path / "missing") == []
    settings = ["seeds=2", "sample_sizes=5", "tail_alphas=2.0", "breakdown_n=10",
                "breakdown_seeds=1", "breakdown_fractions=0.0", "scene_inliers=10"]
    for label in ("b", "a"):
        paper_scale.run_paper_scale("robust_mean", settings, label=label, out=tmp_path)
    (tmp_path / "robust_mean_other-x-cpu.json").write_text('{"experiment": "robust_mean_other"}')
    runs = paper_scale.committed_runs("robust_mean", tmp_path)
    assert [r["label"] for r in runs] == ["a", "b"]  # by file name; the other experiment left out
    assert runs[0]["tables"]["sample_size"]
