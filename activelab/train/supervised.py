"""Standard supervised training (cross-entropy) and batched evaluation.

:class:`StandardTrainer` is also the base of other trainers: they override :meth:`StandardTrainer.prepare`
(attach a head), :meth:`StandardTrainer.training_loss` (add a term) and, if needed,
:meth:`StandardTrainer.parameters`; the loop, schedule, augmentation, early stop and model selection are
shared.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..data.arrays import dataset_labels, iter_batches
from ..errors import ActivelabError
from ..models.introspection import eval_mode, model_device
from .augment import augment_batch
from .base import TrainResult
from .schedules import build_optimizer, build_scheduler

if TYPE_CHECKING:
    from ..config import TrainConfig


def _as_indices(indices: np.ndarray, what: str) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1:
        raise ActivelabError(f"{what} indices must be a 1-D array; got shape {indices.shape}")
    return indices


def inverse_frequency_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class weights n / (C' n_c) over the C' classes present (mean weight 1 per sample); 0 for absent ones."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def prior_offset(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """log of the labeled class frequencies (add-one smoothed): subtracted from the logits it corrects a
    classifier trained on a skewed labeled set towards a uniform class prior (logit adjustment)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


@torch.no_grad()
def _predict(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device,
    logit_offset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    offset = None if logit_offset is None else torch.as_tensor(logit_offset, dtype=torch.float32, device=device)
    with eval_mode(model):
        for x, y in iter_batches(dataset, indices, batch_size):
            out = model(x.to(device))
            if offset is not None:
                out = out - offset
            preds.append(out.argmax(1).cpu())
            labels.append(torch.as_tensor(y))
    if not preds:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(preds).numpy().astype(np.int64), torch.cat(labels).numpy().astype(np.int64)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    logit_offset: np.ndarray | None = None,
) -> np.ndarray:
    """Predicted labels (argmax of the logits) of ``dataset[indices]``, in order; eval mode, no gradients.

    ``device``: where to run (the model is moved there); default: where the model's parameters are. The
    model's train/eval flags are restored afterwards. ``logit_offset`` (C,) is subtracted from the logits first
    (the prior correction: :func:`prior_offset`).
    """
    indices = _as_indices(indices, "evaluation")
    if device is not None:
        model.to(torch.device(device))
    return _predict(model, dataset, indices, batch_size, model_device(model), logit_offset)[0]


def accuracy(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> float:
    """Fraction of ``dataset[indices]`` whose predicted label equals its label."""
    indices = _as_indices(indices, "evaluation")
    if len(indices) == 0:
        raise ActivelabError("cannot measure accuracy on an empty set of indices")
    if device is not None:
        model.to(torch.device(device))
    preds, labels = _predict(model, dataset, indices, batch_size, model_device(model))
    return float((preds == labels).mean())


def _pad_fill(dataset: Dataset) -> torch.Tensor | None:
    """The normalised value of a black pixel (-mean/std per channel) if the dataset normalises its images."""
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        return -mean.float() / std.float()
    return None


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class StandardTrainer:
    """Mini-batch training with cross-entropy; see :meth:`fit`."""

    name = "standard"

    def prepare(self, model: nn.Module) -> None:
        """Nothing to attach for plain cross-entropy training."""

    def parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        """The parameters the optimiser updates (all of the model's, including heads attached by prepare)."""
        return model.parameters()

    def training_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int, cfg: TrainConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, logits) of one batch; ``epoch`` is 0-based. Subclasses add terms here."""
        logits = model(x)
        return self.classification_loss(logits, y), logits

    def classification_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, weighted per class when ``cfg.class_weights`` is set (weights fixed by :meth:`fit`)."""
        weight = getattr(self, "_class_weight", None)
        if weight is None:
            return F.cross_entropy(logits, y)
        w = weight.to(logits.device)[y]
        return (F.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()

    def fit(
        self,
        model: nn.Module,
        dataset: Dataset,
        indices: np.ndarray,
        cfg: TrainConfig,
        *,
        generator: torch.Generator,
        validation: tuple[Dataset, np.ndarray] | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> TrainResult:
        """Train ``model`` in place on ``dataset[indices]`` and return what happened.

        - The model is trained as given (warm start or re-initialisation is the caller's job) with a fresh
          optimiser (``cfg.optimizer``: SGD with momentum and weight decay, or Adam) and the per-epoch
          schedule of :mod:`activelab.train.schedules` (linear warm-up, then x``gamma`` at each milestone).
        - Each epoch visits every index once in an order drawn from ``generator``, in batches of
          ``cfg.batch_size``; the last batch may be smaller (nothing is dropped).
        - ``cfg.augment``: "crop" (random crop, zero padding of
          :func:`~activelab.train.augment.crop_padding` pixels) or "crop_flip" (plus horizontal flips),
          batched, randomness from ``generator``.
        - Stops after ``cfg.epochs`` epochs, or as soon as the accuracy on an epoch's training batches (in
          train mode) reaches ``cfg.until_train_accuracy``.
        - ``cfg.select_by``: "validation" evaluates ``validation`` after every epoch and restores the weights
          of the epoch with the highest validation accuracy (ties keep the earliest such epoch); "last" keeps
          the final weights (and evaluates ``validation``, when given, once at the end). Only the validation
          set given here is ever evaluated: pass a validation split, never the test set.
        - All randomness comes from ``generator``, dropout masks too: the global torch RNG is forked and
          seeded from it for the duration of the call, and restored afterwards. One seed, one set of weights.
        """
        indices = _as_indices(indices, "training")
        if len(indices) == 0:
            raise ActivelabError("there are no labeled samples to train on: label some first (loop.initial)")
        if cfg.select_by == "validation" and validation is None:
            raise ActivelabError("select_by='validation' needs a validation set: pass validation=(dataset, idx)")
        if validation is not None:
            val_dataset, val_idx = validation[0], _as_indices(validation[1], "validation")
            if len(val_idx) == 0:
                raise ActivelabError("the validation set is empty: carve a validation split first")
        self.prepare(model)  # idempotent: trainers that attach heads do it here if the caller did not
        device = torch.device(device)
        model.to(device)
        optimizer = build_optimizer(self.parameters(model), cfg)
        scheduler = build_scheduler(optimizer, cfg)
        fill = _pad_fill(dataset) if cfg.augment != "none" else None
        n = len(indices)
        self._class_weight = None
        if getattr(cfg, "class_weights", "none") == "inverse_frequency":
            y_train = dataset_labels(dataset)[indices]
            num_classes = getattr(dataset, "num_classes", None) or int(y_train.max()) + 1
            self._class_weight = torch.as_tensor(inverse_frequency_weights(y_train, num_classes), dtype=torch.float32)

        history: list[dict] = []
        seconds = eval_seconds = 0.0
        best_acc, best_epoch, best_state = -1.0, 0, None
        train_acc = 0.0
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        cuda = [device.index or 0] if device.type == "cuda" else []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.epochs, desc="train", leave=False)
        was_training = model.training
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            for epoch in range(cfg.epochs):
                start = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                order = indices[torch.randperm(n, generator=generator).numpy()]
                correct, loss_sum = self._train_epoch(model, dataset, order, cfg, epoch, optimizer, generator, fill)
                scheduler.step()
                train_acc = correct / n
                seconds += time.perf_counter() - start
                record = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "loss": loss_sum / n,
                    "train_accuracy": train_acc,
                    "val_accuracy": None,
                }
                if cfg.select_by == "validation":
                    start = time.perf_counter()
                    val_acc = accuracy(model, val_dataset, val_idx, cfg.eval_batch_size)
                    eval_seconds += time.perf_counter() - start
                    record["val_accuracy"] = val_acc
                    if val_acc > best_acc:
                        best_acc, best_epoch, best_state = val_acc, epoch + 1, _cpu_state(model)
                history.append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{train_acc:.3f}")
                if cfg.until_train_accuracy is not None and train_acc >= cfg.until_train_accuracy:
                    break
        if bar is not None:
            bar.close()
        model.train(was_training)
        self._class_weight = None

        val_accuracy: float | None = None
        if cfg.select_by == "validation":
            model.load_state_dict(best_state)
            val_accuracy, selected = best_acc, best_epoch
        else:
            selected = len(history)
            if validation is not None:
                start = time.perf_counter()
                val_accuracy = accuracy(model, val_dataset, val_idx, cfg.eval_batch_size)
                eval_seconds += time.perf_counter() - start
        return TrainResult(
            epochs=len(history),
            seconds=seconds,
            eval_seconds=eval_seconds,
            train_accuracy=train_acc,
            val_accuracy=val_accuracy,
            selected_epoch=selected,
            history=history,
        )

    def _train_epoch(
        self,
        model: nn.Module,
        dataset: Dataset,
        order: np.ndarray,
        cfg: TrainConfig,
        epoch: int,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        fill: torch.Tensor | None,
    ) -> tuple[int, float]:
        """One pass over ``dataset[order]``; returns (correct predictions, summed loss) in train mode."""
        device = model_device(model)
        model.train()
        correct = torch.zeros((), dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for x, y in iter_batches(dataset, order, cfg.batch_size):
            if cfg.augment != "none":
                x = augment_batch(x, cfg.augment, generator, fill)
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
            loss, logits = self.training_loss(model, x, y, epoch, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # accumulated on the device: no synchronisation per batch
                correct += (logits.argmax(1) == y).sum()
                loss_sum += loss.detach().double() * len(y)
        return int(correct), float(loss_sum)


TRAINER = StandardTrainer()
