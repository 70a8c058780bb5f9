"""Offline image data for the experiments: scikit-learn's 8×8 digits and MNIST-1D.

Each dataset is split once, with a fixed seed, into train / validation / test (stratified by
class); seeds of an experiment change the model, the held-out classes and the episodes, never the
split, so no test example is ever used to choose anything. Inputs are standardised with the
training split's mean and std.

Shapes: T examples; digits ``[T, 8, 8]`` (conv2d stem), MNIST-1D ``[T, 40]`` (1-D stems).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

__all__ = ["DATASETS", "ImageData", "base_new_split", "load_dataset"]

DATASETS = ("digits", "mnist1d")
_SPLIT_SEED = 0
_VALIDATION_SHARE = 0.15  # of the non-test data
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class ImageData:
    """One dataset, split. ``x_*`` float32 tensors, ``y_*`` int64 ``[T]``.

    Attributes:
        name: ``"digits"`` or ``"mnist1d"``.
        stem_type, input_size: what :class:`MoEImageClassifierConfig` needs to read ``x``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    stem_type: str
    input_size: int

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test'; got {name!r}.")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


def _stratified_split(y: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, held)`` with ``share`` of every class in ``held``."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_held = int(round(share * len(idx)))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mean, std = train.mean(), train.std() + 1e-8
    return [torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in (train, *others)]


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, mnist1d_stem: str = "conv1d") -> ImageData:
    """Load and split ``name`` (``"digits"`` or ``"mnist1d"``); cached per process.

    Args:
        mnist1d_stem: the 1-D stem the MNIST-1D models use (``"conv1d"`` or ``"mlp"``).
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x_all, y_all = bunch.images.astype(np.float64), bunch.target.astype(np.int64)
        rest, test = _stratified_split(y_all, 0.25, _SPLIT_SEED)
        x_rest, y_rest, x_test, y_test = x_all[rest], y_all[rest], x_all[test], y_all[test]
        stem, size = "conv2d", 8
    elif name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = 5000  # the package default: 4,000 train + 1,000 test, generated offline
        state = np.random.get_state()
        try:
            data = make_dataset(args)  # seeds numpy's global RNG itself; restored below
        finally:
            np.random.set_state(state)
        x_rest, y_rest = data["x"].astype(np.float64), data["y"].astype(np.int64)
        x_test, y_test = data["x_test"].astype(np.float64), data["y_test"].astype(np.int64)
        if mnist1d_stem not in ("conv1d", "mlp"):
            raise ValueError(f"mnist1d_stem must be 'conv1d' or 'mlp'; got {mnist1d_stem!r}.")
        stem, size = mnist1d_stem, x_rest.shape[1]
    else:
        raise ValueError(f"dataset must be one of {', '.join(map(repr, DATASETS))}; got {name!r}.")
    train, val = _stratified_split(y_rest, _VALIDATION_SHARE, _SPLIT_SEED + 1)
    x_train, x_val, x_test_t = _standardise(x_rest[train], x_rest[val], x_test)
    return ImageData(
        name=name,
        x_train=x_train,
        y_train=torch.from_numpy(y_rest[train]),
        x_val=x_val,
        y_val=torch.from_numpy(y_rest[val]),
        x_test=x_test_t,
        y_test=torch.from_numpy(y_test),
        stem_type=stem,
        input_size=size,
    )


def base_new_split(seed: int, num_new: int = 2) -> tuple[list[int], list[int]]:
    """The base classes and the held-out ("new") classes of experiment seed ``seed``.

    A seeded permutation of the 10 classes: the first ``num_new`` are held out. Every router sees
    the same split at the same seed, so comparisons are paired.
    """
    if not 1 <= num_new < NUM_CLASSES - 1:
        raise ValueError(f"num_new must be between 1 and {NUM_CLASSES - 2}; got {num_new}.")
    perm = np.random.default_rng(1000 + seed).permutation(NUM_CLASSES).tolist()
    return sorted(perm[num_new:]), sorted(perm[:num_new])
