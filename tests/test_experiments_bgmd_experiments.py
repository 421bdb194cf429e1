"""experiments.bgmd_experiments: the grids of Tables 2-4 and Figs. 1-3, 6; the paper's numbers."""

import dataclasses
import math

import pytest

from median_sgd.experiments import SCALES, bgmd_experiments as be
from median_sgd.experiments.bgmd_training import method


def tiny_config():
    ci = be.CONFIGS["ci"]
    short = dict(epochs=0.5, eval_every=2, seeds=(0,),
                 methods=(method("mean", "SGD"), method("gmd", "GmD")))
    return be.BGmDExperimentsConfig(
        table2=dataclasses.replace(ci.table2, attacks=("bit_flip",), psis=(0.0, 0.4), **short),
        table3=dataclasses.replace(ci.table3, attacks=("gradient_noise",), psis=(0.4,), **short),
        table4=dataclasses.replace(ci.table4, attacks=("bit_flip",), psis=(0.4,), **short),
        fig6=dataclasses.replace(ci.fig6, epochs=0.5, eval_every=2, seeds=(0,),
                                 methods=be.fig6_methods((0.1,))[:2]),
    )


def test_paper_tables_are_complete():
    for _, table in be.PAPER_TABLES.items():
        assert ("none", 0.0) in table
        for key, row in table.items():
            assert key[0] in be.ATTACK_NAMES and set(row) == {"SGD", "CmD", "BGmD", "GmD"}
            for value in row.values():
                assert value is None or (0 < value[0] < 100 and value[1] >= 0)
    assert len(be.PAPER_TABLES["table2"]) == 11 and len(be.PAPER_TABLES["table3"]) == 5
    assert be.PAPER_TABLES["table2"]["bit_flip", 0.4]["BGmD"] == (85.67, 0.09)
    assert be.PAPER_TABLES["table4"]["gradient_noise", 0.4]["SGD"] is None


def test_configs_cover_the_paper_grids():
    assert set(be.CONFIGS) == set(SCALES)
    for scale in SCALES:
        cfg = be.CONFIGS[scale]
        for name in ("table2", "table3", "table4"):
            exp = cfg.experiment(name)
            keys = {(a, p) for p in exp.psis if p > 0 for a in exp.attacks} | {("none", 0.0)}
            assert set(be.PAPER_TABLES[name]) <= keys, (scale, name)
            assert [m.label for m in exp.methods] == ["SGD", "CmD", "BGmD", "GmD"]
        assert cfg.table4.split == "shards" and cfg.table2.split == "iid"
    assert 0.1 in be.CONFIGS["paper"].table2.psis  # Figs. 1-3 show 10% as well
    assert be.CONFIGS["paper"].table4.model == "resnet18"
    with pytest.raises(ValueError, match="unknown experiment"):
        be.CONFIGS["ci"].experiment("table9")


def test_fig6_methods():
    labels = [m.label for m in be.fig6_methods((0.05, 0.2))]
    assert labels == ["BGmD 0.05 M", "BGmD 0.05", "BGmD 0.2 M", "BGmD 0.2", "GmD"]
    options = dict(be.fig6_methods((0.05,))[1].options)
    assert options == {"k": 0.05, "memory": None}


def test_run_and_final_accuracy():
    result = be.run(tiny_config())
    records = result.records
    assert {r["experiment"] for r in records} == set(be.EXPERIMENTS)
    assert be.final_accuracy(result, "table2") == be.final_accuracy(records, "table2")
    table = be.final_accuracy(records, "table2")
    assert set(table) == {("none", 0.0, "SGD"), ("none", 0.0, "GmD"), ("bit_flip", 0.4, "SGD"),
                          ("bit_flip", 0.4, "GmD")}
    assert table["bit_flip", 0.4, "SGD"]["diverged"] == 1  # -100 g on 40% of the rows
    assert math.isnan(table["bit_flip", 0.4, "SGD"]["accuracy"])
    assert 0 <= table["bit_flip", 0.4, "GmD"]["accuracy"] <= 100
    assert table["none", 0.0, "GmD"]["seeds"] == 1 and table["none", 0.0, "GmD"]["time_s"] > 0
    text = be.comparison_table(records, "table2").splitlines()
    assert len(text) == 2 + len(be.PAPER_TABLES["table2"])
    assert "div." in text[2 + list(be.PAPER_TABLES["table2"]).index(("bit_flip", 0.4))]
    assert "n/a" in text[-1]  # the backdoor was not run in this tiny grid
    assert text[2].split("|")[1].split() == ["89.4", "83.8", "89.2", "89.0"]
    assert max(len(line) for line in text) <= 78  # a book page's code width
    fig6 = be.final_accuracy(records, "fig6")
    assert {k[2] for k in fig6} == {"BGmD 0.1 M", "BGmD 0.1"}
    with pytest.raises(ValueError, match="unknown experiment"):
        be.run(tiny_config(), ["table7"])
    with pytest.raises(ValueError, match="unknown scale"):
        be.run("huge")
    with pytest.raises(TypeError):
        be.run(42)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df, t in be.T975.items():
        assert t == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)


def test_mean_interval():
    mean, half = be.mean_interval([80.0, 82.0, 84.0])
    assert mean == 82.0 and half == pytest.approx(4.303 * 2.0 / math.sqrt(3))
    assert be.mean_interval([5.0, 5.0])[1] == 0.0
    assert be.mean_interval([7.0])[0] == 7.0 and math.isnan(be.mean_interval([7.0])[1])
    with pytest.raises(ValueError, match="at least one"):
        be.mean_interval([])
    with pytest.raises(ValueError, match="at most 11"):
        be.mean_interval([1.0] * 12)


def _final(seed, acc, diverged=False, attack="none", psi=0.0, m="GmD"):
    return dict(experiment="table2", attack=attack, psi=psi, method=m, seed=seed, iteration=10,
                test_accuracy=acc, diverged=diverged, time_s=1.0)


def test_final_accuracy_over_seeds_and_the_table_cells():
    records = [_final(1, 0.82), _final(0, 0.80), _final(2, 0.84),
               dict(_final(0, 0.1), iteration=5),  # an earlier record: not the final one
               _final(0, 0.5, m="CmD"), _final(1, math.nan, True, m="CmD"),
               _final(0, math.nan, True, m="SGD"), _final(1, math.nan, True, m="SGD")]
    table = be.final_accuracy(records, "table2")
    gmd = table["none", 0.0, "GmD"]
    assert gmd["accuracies"] == pytest.approx([80.0, 82.0, 84.0])  # in seed order
    assert gmd["accuracy"] == pytest.approx(82.0) and gmd["seeds"] == 3
    assert gmd["interval"] == pytest.approx(4.303 * 2.0 / math.sqrt(3))
    cmd = table["none", 0.0, "CmD"]
    assert cmd["diverged"] == 1 and cmd["seeds"] == 2 and math.isnan(cmd["accuracy"])
    cells = be.comparison_table(records, "table2").splitlines()[2].split("|")[0].split()
    assert cells == ["clean", "-", "div.", "div.1/2", "n/a", "82.0±5.0"]
    assert len(be.comparison_table(records, "table2").splitlines()) == 2 + len(be.PAPER_TABLES["table2"])
    short = be.comparison_table(records, "table2", skip_missing=True).splitlines()
    assert len(short) == 3 and short[2].startswith("clean")  # only the setting we ran
