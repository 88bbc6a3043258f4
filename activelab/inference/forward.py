"""Batched forward passes over a dataset, streamed, with the classifier's input captured by a hook."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.arrays import iter_batches
from ..models.introspection import classifier_name, eval_mode, model_device, named_module
from .device import inference_autocast, to_device


@dataclass
class ForwardOutputs:
    logits: np.ndarray  # (N, C) float32
    embeddings: np.ndarray | None  # (N, d) float32: the classifier's input


@torch.no_grad()
def forward_pass(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    batch_size: int = 512,
    embeddings: bool = False,
    classifier: str | None = None,
) -> ForwardOutputs:
    """Logits (and optionally the classifier's input) for ``dataset[indices]``, in order.

    Memory: the outputs, O(N·(C + d)); the device holds one batch at a time. Inside
    :func:`~activelab.inference.device.half_precision`, CUDA passes run in float16 autocast.
    """
    device = model_device(model)
    captured: list[torch.Tensor] = []
    hook = None
    if embeddings:
        layer = named_module(model, classifier_name(model, classifier))
        hook = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1).cpu()))
    logits = []
    try:
        with eval_mode(model):
            for x, _ in iter_batches(dataset, indices, batch_size):
                with inference_autocast(device):
                    out = model(to_device(x, device))
                logits.append(out.float().cpu())
    finally:
        if hook is not None:
            hook.remove()
    n_classes = logits[0].shape[1] if logits else 0
    out_logits = torch.cat(logits).numpy() if logits else np.zeros((0, n_classes), np.float32)
    out_emb = None
    if embeddings:
        out_emb = torch.cat(captured).float().numpy() if captured else np.zeros((0, 0), np.float32)
    return ForwardOutputs(out_logits, out_emb)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
