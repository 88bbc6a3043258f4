"""Rotation self-supervised pretraining (RotNet; Gidaris et al., ICLR 2018): FK's initial model θ⁰.

Every image of the (unlabeled, biased) pool is shown in four copies rotated by 0/90/180/270 degrees and a
4-way head, in place of the classifier, learns which rotation it sees. Afterwards the classifier is replaced by
a fresh C-way head, so what is kept is the backbone (as the FK paper loads it at the first round).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..errors import ActivelabError
from ..models.introspection import classifier_name, named_module
from .schedules import build_optimizer, build_scheduler


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) square images -> (4B, C, H, W) copies rotated by 0, 90, 180, 270 degrees
    (counter-clockwise) and their rotation labels 0..3, block by block."""
    if x.shape[-1] != x.shape[-2]:
        raise ActivelabError(f"rotation pretraining needs square images; got {tuple(x.shape[-2:])}")
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(len(x))
    return rotated, labels


def _fetch(dataset: Dataset, idx: np.ndarray) -> torch.Tensor:
    if hasattr(dataset, "batch"):
        return dataset.batch(idx)[0]
    return torch.stack([dataset[int(i)][0] for i in idx])


def _fresh_head(model: nn.Module, out_features: int, generator: torch.Generator) -> None:
    from ..models import replace_classifier

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
        replace_classifier(model, out_features)


def rotation_pretrain(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    cfg,
    *,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Pretrain ``model``'s backbone on rotation prediction over ``dataset[indices]`` (labels unused), in place.

    Args:
        model: a classifier (its ``classifier_name`` or last ``nn.Linear`` is the head).
        dataset, indices: the unlabeled pool.
        cfg: an :class:`activelab.config.PretrainConfig` (epochs, lr, momentum, weight_decay, batch_size
            images per step (x4 rotated copies), milestones, gamma).
        generator: seeds the shuffling and both heads' initialisation (the caller's torch RNG is untouched).
        device: where to train; the model is left there.
        progress: print one line per epoch.

    Returns:
        ``{"epochs", "seconds", "rotation_accuracy" (last epoch, on its training batches), "history"
        (per epoch: epoch, lr, loss, rotation_accuracy)}``. The model ends with a fresh C-way classifier
        (same C as on entry) on top of the pretrained backbone.

    Time: epochs x 4N forward+backward passes. Memory: one batch of 4 x batch_size images.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise ActivelabError("rotation pretraining needs a non-empty pool")
    head = named_module(model, classifier_name(model))
    if not isinstance(head, nn.Linear):
        raise ActivelabError(f"the classifier must be an nn.Linear to swap in a rotation head; got {type(head)}")
    num_classes = head.out_features
    device = torch.device(device)
    _fresh_head(model, 4, generator)
    model.to(device).train()
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    history: list[dict] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))  # dropout masks
        for epoch in range(cfg.epochs):
            lr = optimizer.param_groups[0]["lr"]
            order = indices[torch.randperm(len(indices), generator=generator).numpy()]
            loss_sum, correct, seen = 0.0, 0, 0
            for s in range(0, len(order), cfg.batch_size):
                x = _fetch(dataset, order[s : s + cfg.batch_size]).to(device)
                xr, yr = rotate_batch(x)
                logits = model(xr)
                loss = F.cross_entropy(logits, yr)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(yr)
                correct += int((logits.detach().argmax(1) == yr).sum())
                seen += len(yr)
            scheduler.step()
            history.append({"epoch": epoch + 1, "lr": lr, "loss": loss_sum / seen, "rotation_accuracy": correct / seen})
            if progress:
                h = history[-1]
                print(
                    f"rotation epoch {h['epoch']}/{cfg.epochs}: loss {h['loss']:.4f} acc {h['rotation_accuracy']:.3f}"
                )
    seconds = time.perf_counter() - start
    _fresh_head(model, num_classes, generator)
    model.to(device)
    return {
        "epochs": cfg.epochs,
        "seconds": seconds,
        "rotation_accuracy": history[-1]["rotation_accuracy"],
        "history": history,
    }
