"""What every job of one run shares: the biased pool, the validation split, the test set and the initial
model weights. Each is a pure function of (config, run), so every strategy of a run starts from the same
state, in whichever process it runs."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import DatasetConfig, ExperimentConfig
from ..data.arrays import ArrayDataset, dataset_labels
from ..data.bias import biased_pool_indices, minority_classes, pool_class_counts
from ..data.imbalance import clip_classes, symmetric_noise
from ..data.sources import load_split, split_location
from ..data.splits import carve_validation, restrict_classes
from ..errors import ActivelabError
from ..models import build_model
from .layout import Layout, temp_path
from .seeding import numpy_rng, torch_generator, torch_seed


@dataclass
class RunData:
    run: int
    pool: Dataset
    pool_indices: np.ndarray  # into the training split
    validation: Dataset | None
    validation_indices: np.ndarray
    test: Dataset
    class_counts: dict[int, int]
    minority: list[int]
    initial: np.ndarray  # pool indices labeled before the first round
    num_classes: int
    in_channels: int
    image_size: int
    data_root: str | None = None  # the folder the dataset's files were read from


def load_data(cfg: DatasetConfig) -> tuple[Dataset, Dataset]:
    """The (train, test) splits of a dataset config, restricted to its classes; cached per process."""
    return _load_data(cfg.model_dump_json())


@functools.lru_cache(maxsize=4)
def _load_data(cfg_json: str) -> tuple[Dataset, Dataset]:
    cfg = DatasetConfig.model_validate_json(cfg_json)
    train = load_split(cfg.name, "train", root=cfg.root, download=cfg.download)
    test = load_split(cfg.name, "test", root=cfg.root, download=cfg.download)
    if cfg.classes:
        train, test = restrict_classes(train, cfg.classes), restrict_classes(test, cfg.classes)
    if cfg.clip_to:
        train, test = clip_classes(train, cfg.clip_to), clip_classes(test, cfg.clip_to)
    return train, test


def _subset(dataset: Dataset, indices: np.ndarray) -> Dataset:
    if isinstance(dataset, ArrayDataset):
        return dataset.subset(indices)
    return torch.utils.data.Subset(dataset, indices.tolist())


def _shape(dataset: Dataset) -> tuple[int, int, int]:
    if isinstance(dataset, ArrayDataset):
        return dataset.num_classes, dataset.in_channels, dataset.image_size
    x, _ = dataset[0]
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return len(base.classes), int(x.shape[0]), int(x.shape[-1])


def prepare_run(cfg: ExperimentConfig, run: int) -> RunData:
    train, test = load_data(cfg.dataset)
    labels = dataset_labels(train)
    num_classes, in_channels, image_size = _shape(train)
    seed = cfg.loop.seed
    if cfg.validation.per_class > 0:
        val_idx, rest = carve_validation(labels, cfg.validation.per_class, numpy_rng(seed, run, "validation"))
    else:
        val_idx, rest = np.zeros(0, np.int64), np.arange(len(labels))
    chosen = biased_pool_indices(labels[rest], cfg.bias, numpy_rng(seed, run, "bias"))
    pool_idx = rest[chosen]
    pool_labels = labels[pool_idx]
    counts = pool_class_counts(labels, pool_idx)
    if cfg.loop.initial + cfg.loop.budget * cfg.loop.rounds > len(pool_idx):
        raise ActivelabError(
            f"the pool has {len(pool_idx)} samples but initial + budget x rounds = "
            f"{cfg.loop.initial + cfg.loop.budget * cfg.loop.rounds}: lower the budget or the rounds"
        )
    initial = numpy_rng(seed, run, "initial").choice(len(pool_idx), cfg.loop.initial, replace=False)
    del pool_labels
    pool = _subset(train, pool_idx)
    if cfg.bias.label_noise > 0:  # the annotator's mistakes: pool labels only, never validation or test
        if not isinstance(pool, ArrayDataset):
            raise ActivelabError("bias.label_noise needs an in-memory dataset (the built-in ones)")
        noisy = symmetric_noise(pool.targets, cfg.bias.label_noise, num_classes, numpy_rng(seed, run, "noise"))
        pool = pool.with_labels(noisy)
    return RunData(
        run=run,
        pool=pool,
        pool_indices=pool_idx,
        validation=_subset(train, val_idx) if len(val_idx) else None,
        validation_indices=val_idx,
        test=test,
        class_counts=counts,
        minority=minority_classes(counts),
        initial=np.sort(initial).astype(np.int64),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        data_root=split_location(cfg.dataset.name, "train", cfg.dataset.root),
    )


def new_model(cfg: ExperimentConfig, data: RunData) -> nn.Module:
    return build_model(cfg.model, data.num_classes, data.in_channels, data.image_size)


def initial_model_path(exp_dir: Path, run: int, init: str) -> Path:
    return Layout(exp_dir).initial_model(run, init)


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, os.getpid())
    torch.save(obj, tmp)
    os.replace(tmp, path)


def ensure_initial_model(
    cfg: ExperimentConfig,
    exp_dir: Path,
    data: RunData,
    init: str,
    device: torch.device,
    progress: bool = False,
) -> dict:
    """The initial weights of ``run`` for ``init`` ("random" or "rotation"), made once and kept on disk.

    Several workers, on one machine or several (Ray), may ask at once: a lease in the results store makes
    exactly one of them build the weights while the others wait for the file (see :func:`holding_lease`).
    """
    path = initial_model_path(exp_dir, data.run, init)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        from .lease import holding_lease

        with holding_lease(Layout(exp_dir).store, f"initial-model/run{data.run}/{init}", done=path.exists):
            if not path.exists():
                state = make_initial_model(cfg, data, init, device, progress)
                atomic_save(state, path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ActivelabError(
            f"initial model {path} is damaged ({type(exc).__name__}: {exc}): delete it and run again; it is remade "
            "identically (its weights are a function of the config and the run)"
        ) from None


def make_initial_model(cfg: ExperimentConfig, data: RunData, init: str, device, progress: bool = False) -> dict:
    seed = cfg.loop.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed, data.run, "init-weights"))
        model = new_model(cfg, data)
    if init == "rotation":
        from ..train.rotation import rotation_pretrain

        model.to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed(seed, data.run, "rotation-head"))
            rotation_pretrain(
                model,
                data.pool,
                np.arange(len(data.pool)),
                cfg.pretrain,
                generator=torch_generator(seed, data.run, "rotation"),
                device=device,
                progress=progress,
            )
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
