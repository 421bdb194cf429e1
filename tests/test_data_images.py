"""Image data: the offline digits, the lazy optional torchvision import, the client splits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from median_sgd.data import ImageData, iid_split, load_digits, load_images, shard_split


def test_digits_offline():
    data = load_digits()
    assert isinstance(data, ImageData)
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == torch.float32
    assert len(data.x_train) + len(data.x_test) == 1797
    assert len(data.x_test) == 360
    assert data.x_train.min() >= 0 and data.x_train.max() <= 1
    assert set(data.y_train.unique().tolist()) == set(range(10))
    # stratified: every class in the test set
    assert set(data.y_test.unique().tolist()) == set(range(10))
    z = data.normalize(data.x_train)
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-3
    assert torch.equal(load_digits().x_train, data.x_train)  # deterministic
    assert not torch.equal(load_digits(seed=1).y_test, data.y_test)
    assert load_images("digits").x_train.shape == data.x_train.shape


def test_importing_the_data_package_does_not_import_torchvision():
    code = "import sys, median_sgd.data, median_sgd.experiments.bgmd_training; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_paper_datasets_need_torchvision(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install torchvision"):
        load_images(name)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown image dataset 'svhn'"):
        load_images("svhn")
    with pytest.raises(TypeError):
        load_images(3)


def test_iid_split_is_a_partition():
    parts = iid_split(103, 10, generator=torch.Generator().manual_seed(0))
    assert len(parts) == 10
    assert sorted(torch.cat(parts).tolist()) == list(range(103))
    assert {len(p) for p in parts} == {10, 11}
    with pytest.raises(ValueError):
        iid_split(3, 5)


def test_shard_split_follows_the_paper():
    labels = torch.arange(10).repeat_interleave(600)  # 6000 samples, sorted or not
    labels = labels[torch.randperm(6000, generator=torch.Generator().manual_seed(1))]
    parts = shard_split(labels, 10, generator=torch.Generator().manual_seed(2))
    assert len(parts) == 10
    every = torch.cat(parts)
    assert len(every) == 6000 and len(set(every.tolist())) == 6000  # 80 shards x 75, all used
    for p in parts:
        assert len(p) == 8 * 75
    classes = [len(set(labels[p].tolist())) for p in parts]
    assert sum(classes) / len(classes) < 8  # i.i.d. clients of 600 samples would see all 10
    # each shard is label-contiguous: within a client, labels come in runs of whole shards
    for p in parts:
        runs = labels[p].view(8, 75)
        assert all(len(set(r.tolist())) <= 2 for r in runs)
    with pytest.raises(ValueError):
        shard_split(labels, 11)  # 11 x 8 > 80
    with pytest.raises(TypeError):
        shard_split(labels.float(), 10)


@pytest.mark.parametrize("option, value", [("n_shards", 0), ("n_shards", -4), ("n_shards", 2.5),
                                           ("n_shards", True), ("shards_per_client", 0),
                                           ("shards_per_client", -1), ("shards_per_client", 1.0)])
def test_shard_split_rejects_bad_shard_counts(option, value):
    labels = torch.arange(10).repeat_interleave(10)
    with pytest.raises(ValueError, match=option):
        shard_split(labels, 2, **{option: value})


def test_shard_split_small_counts_and_no_mutation():
    labels = torch.tensor([3, 1, 2, 0, 1, 3])
    before = labels.clone()
    parts = shard_split(labels, 2, n_shards=2, shards_per_client=1,
                        generator=torch.Generator().manual_seed(0))
    assert sorted(torch.cat(parts).tolist()) == list(range(6))
    # sorted by label: [0, 1, 1] and [2, 3, 3] are the two shards
    assert {frozenset(labels[p].tolist()) for p in parts} == {frozenset({0, 1}), frozenset({2, 3})}
    assert torch.equal(labels, before)


@pytest.fixture
def fake_torchvision(tmp_path, monkeypatch):
    """Install a fake ``torchvision`` package (files on sys.path) whose import raises, as a
    torchvision built for another torch does; removed from sys.path and sys.modules afterwards."""
    before = {k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")}
    assert not before, "a real torchvision is imported; these tests simulate a broken one"
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(init: str = "", datasets: str = ""):
        pkg = tmp_path / "torchvision"
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text(init)
        (pkg / "datasets.py").write_text(datasets)

    yield make
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]


# What a torchvision that does not match the installed torch raises on import, in the wild.
BROKEN = [
    ("RuntimeError", "operator torchvision::nms does not exist"),
    ("OSError", "libtorchvision.so: undefined symbol: _ZN3c1017RegisterOperators"),
    ("AttributeError", "partially initialized module 'torchvision' has no attribute 'extension'"),
    ("ModuleNotFoundError", "No module named 'PIL'", ),
]


@pytest.mark.parametrize("exc, message", BROKEN)
@pytest.mark.parametrize("where", ["init", "datasets"])
def test_a_broken_torchvision_gives_our_message_with_the_cause(fake_torchvision, exc, message, where):
    source = (f"raise ModuleNotFoundError({message!r}, name='PIL')" if exc == "ModuleNotFoundError"
              else f"raise {exc}({message!r})")
    fake_torchvision(**{where: source})
    with pytest.raises(ImportError, match="torchvision is installed but failed to import") as info:
        load_images("mnist")
    assert "matches your torch" in str(info.value) and message in str(info.value)
    expected = {"RuntimeError": RuntimeError, "OSError": OSError, "AttributeError": AttributeError,
                "ModuleNotFoundError": ModuleNotFoundError}[exc]
    assert type(info.value.__cause__) is expected
    assert message in str(info.value.__cause__)


def test_a_missing_torchvision_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match="not installed: `pip install torchvision`") as info:
        load_images("cifar10")
    assert isinstance(info.value.__cause__, ImportError)
