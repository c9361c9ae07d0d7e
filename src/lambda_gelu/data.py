"""Data sets behind one registry, with deterministic splits. Nothing here downloads at run time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset


class DataError(ValueError):
    """A data set cannot be loaded: unknown name, missing or malformed files."""


@dataclass(frozen=True)
class Split:
    """Train and test tensors of a classification data set."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the batch dim)."""
        return tuple(self.x_train.shape[1:])

    def train_loader(self, batch_size: int, seed: int = 0) -> DataLoader:
        """Shuffled training batches; the order depends only on ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            TensorDataset(self.x_train, self.y_train), batch_size=batch_size, shuffle=True, generator=generator
        )

    def test_batches(self, batch_size: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The test set as a list of (input, target) batches, in order."""
        return list(zip(self.x_test.split(batch_size), self.y_test.split(batch_size), strict=False))

    def train_batches(self, batch_size: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training set as a list of (input, target) batches, in order (for calibration)."""
        return list(zip(self.x_train.split(batch_size), self.y_train.split(batch_size), strict=False))


def _split(name: str, x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int, num_classes: int) -> Split:
    """Deterministic stratified-free random split by a seeded permutation."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(x))
    test, train = order[:n_test], order[n_test:]
    return Split(name, x[train], y[train], x[test], y[test], num_classes)


def load_digits(data_dir: str | Path | None = None, seed: int = 0) -> Split:
    """scikit-learn's 8×8 digits (1797 images, shipped with the package), 64 features in [0, 1]; 30% test."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return _split("digits", x, y, 0.3, seed, 10)


def load_mnist1d(data_dir: str | Path | None = None, seed: int = 0) -> Split:
    """MNIST-1D (4000 train / 1000 test, length 40), built locally by the ``mnist1d`` package.

    The data set's own split is kept; ``seed`` is the generator seed of its
    construction (0 gives the reference data set).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:  # pragma: no cover - mnist1d is a dependency
        raise DataError("MNIST-1D needs the 'mnist1d' package: pip install mnist1d") from error
    args = get_dataset_args()
    args.seed = args.seed + seed
    data = make_dataset(args)
    to_x = lambda a: torch.tensor(a, dtype=torch.float32)
    to_y = lambda a: torch.tensor(a, dtype=torch.long)
    return Split("mnist1d", to_x(data["x"]), to_y(data["y"]), to_x(data["x_test"]), to_y(data["y_test"]), 10)


DATASETS: dict[str, Callable[..., Split]] = {"digits": load_digits, "mnist1d": load_mnist1d}


def load_dataset(name: str, data_dir: str | Path | None = None, seed: int = 0) -> Split:
    """Load a registered data set by name (see ``DATASETS``)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"data directory {str(data_dir)!r} does not exist")
    return DATASETS[name](data_dir=data_dir, seed=seed)
