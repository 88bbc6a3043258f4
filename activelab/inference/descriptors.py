"""FK descriptors: pooled tapped activations z and Fisher scores g (gradients w.r.t. those activations).

For a list of tapped layers, each tapped activation is global-average-pooled over its spatial dimensions to a
channel vector and the vectors are concatenated: ``z`` (N, L). The Fisher score ``g`` is the gradient of
``CE(logits, s)`` with respect to the same tapped activations (not the weights), pooled the same way, for a
pseudo-label ``s`` per sample.

One forward and one backward pass per batch give every sample's ``g``: the model runs in eval mode, where
samples do not interact (BatchNorm uses its running statistics, dropout is off), so the gradient of the summed
loss with respect to sample i's activation is the gradient of sample i's own loss. Several label sets cost one
extra backward each (the graph is retained), and a label set may be a function of the batch's ``z``, logits
and earlier gradients: this is how the p_hat estimator labels the pool in the same pass that computes ``g``.

The perturbation-based estimators (``trace_cov``, ``mutual_info``) need the gradients for every class over K
perturbed copies of each image: :func:`perturbed_class_scores` runs them batched (copies x batch in one
forward, one backward per class) and keeps only per-sample accumulators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.arrays import iter_batches
from ..errors import ActivelabError
from ..models.introspection import TapCapture, eval_mode, model_device, pool_activation


@dataclass
class BatchState:
    """What a label function sees for one batch (all tensors detached, on the model's device)."""

    positions: np.ndarray  # positions of the batch's samples in the ``indices`` passed in
    z: torch.Tensor  # (B, L) pooled activations
    logits: torch.Tensor  # (B, C)
    g: dict[str, torch.Tensor] = field(default_factory=dict)  # gradients of the label sets computed before


#: A label set: an array aligned with ``indices``, ``"argmax"`` (the model's prediction), or a function of
#: the batch returning a (B,) int64 tensor.
LabelSpec = np.ndarray | Literal["argmax"] | Callable[[BatchState], torch.Tensor]


@dataclass
class Descriptors:
    """z (N, L), g per label set (N, L), the labels used, logits (N, C) and segment boundaries.

    ``segments`` holds the tap boundaries in L: tap j covers columns ``segments[j]:segments[j + 1]``.
    """

    z: np.ndarray
    g: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    logits: np.ndarray
    segments: np.ndarray
    taps: list[str]

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


def _resolve_labels(spec: LabelSpec, state: BatchState, device: torch.device) -> torch.Tensor:
    if isinstance(spec, str):
        if spec != "argmax":
            raise ActivelabError(f"unknown label set {spec!r}; use 'argmax', an array of labels, or a function")
        return state.logits.argmax(dim=1)
    if callable(spec):
        labels = spec(state)
        return torch.as_tensor(labels, dtype=torch.int64, device=device)
    return torch.as_tensor(np.asarray(spec)[state.positions], dtype=torch.int64, device=device)


def compute_descriptors(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    taps: Sequence[str],
    labels: Mapping[str, LabelSpec] | None = None,
    batch_size: int = 512,
) -> Descriptors:
    """Pooled features and Fisher scores of ``dataset[indices]`` at ``taps``, batched.

    Args:
        model: returns logits; run in eval mode (restored afterwards).
        dataset, indices: the samples, in order.
        taps: module names; their outputs are the tapped activations.
        labels: ordered label sets ``{name: spec}``; ``g[name]`` is computed for each. Without label sets only
            the forward pass runs (no gradients).
        batch_size: samples per pass.

    Time: one forward pass plus one backward pass (to the first tap) per label set. Memory: O(N·(L + C)) for
    the outputs; the device holds one batch.
    """
    indices = np.asarray(indices, dtype=np.int64)
    labels = dict(labels or {})
    for name, spec in labels.items():
        if not (isinstance(spec, str) or callable(spec)) and len(np.asarray(spec)) != len(indices):
            raise ActivelabError(f"label set {name!r} has {len(np.asarray(spec))} labels for {len(indices)} samples")
    device = model_device(model)
    n = len(indices)
    # outputs are allocated once, after the first batch tells their widths (no per-batch pieces to join)
    z_out = logits_out = None
    g_out: dict[str, np.ndarray] = {}
    s_out = {name: np.empty(n, np.int64) for name in labels}
    sizes: list[int] | None = None
    start = 0
    with eval_mode(model), TapCapture(model, taps) as hooks, torch.set_grad_enabled(bool(labels)):
        for x, _ in iter_batches(dataset, indices, batch_size):
            x = x.to(device)
            if labels:
                x.requires_grad_(True)  # tapped activations join the graph even if the weights are frozen
            logits = model(x).float()
            acts = hooks.take()
            z = torch.cat([pool_activation(a.detach()).float() for a in acts], dim=1)
            if sizes is None:
                sizes = [pool_activation(a).shape[1] for a in acts]
                z_out = np.empty((n, z.shape[1]), np.float32)
                logits_out = np.empty((n, logits.shape[1]), np.float32)
                g_out = {name: np.empty((n, z.shape[1]), np.float32) for name in labels}
            rows = slice(start, start + len(x))
            state = BatchState(np.arange(start, start + len(x)), z, logits.detach())
            for i, (name, spec) in enumerate(labels.items()):
                s = _resolve_labels(spec, state, device)
                loss = F.cross_entropy(logits, s, reduction="sum")
                grads = torch.autograd.grad(loss, acts, retain_graph=i < len(labels) - 1, allow_unused=True)
                pooled = [
                    torch.zeros(len(x), w, device=device) if gr is None else pool_activation(gr).float()
                    for gr, w in zip(grads, sizes, strict=True)
                ]
                state.g[name] = torch.cat(pooled, dim=1)
                g_out[name][rows] = state.g[name].cpu().numpy()
                s_out[name][rows] = s.cpu().numpy()
            z_out[rows] = z.cpu().numpy()
            logits_out[rows] = logits.detach().cpu().numpy()
            start += len(x)
    if sizes is None:
        raise ActivelabError("no samples to describe: the index list is empty")
    segments = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return Descriptors(z=z_out, g=g_out, labels=s_out, logits=logits_out, segments=segments, taps=list(taps))


# -- perturbation-based estimators ---------------------------------------------------------------------------


def perturb(x: torch.Tensor, angles: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rotate each image of ``x`` (B, C, H, W, normalised) by ``angles`` (B,) radians about its centre
    (bilinear, border padding) and add ``noise`` (B, C, H, W)."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False) + noise


def _logdet_ridge(cov: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return torch.linalg.cholesky_ex(cov + ridge[..., None, None] * eye)[0].diagonal(dim1=-2, dim2=-1).log().sum(-1) * 2


def gaussian_mutual_information(z: torch.Tensor, g: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """I(z; g) of Gaussians fitted over K copies: log det S_zz + log det S_gg - log det S_joint.

    Args:
        z: (..., K, L) features of K perturbed copies.
        g: (..., K, L') Fisher scores of the same copies (leading dimensions broadcast with z's).
        ridge: each covariance block gets ``ridge * (mean variance of the block) + 1e-12`` added to its
            diagonal, the same on the marginal and the joint, so the result is finite and >= 0.

    Returns: (...,) in nats x 2 (the 1/2 factor of the Gaussian MI is dropped; argmax is unchanged).
    Time O(K·(L + L')² + (L + L')³) per sample.
    """
    lead = torch.broadcast_shapes(z.shape[:-1], g.shape[:-1])
    z = z.double().expand(*lead, z.shape[-1])
    g = g.double().expand(*lead, g.shape[-1])
    z = z - z.mean(dim=-2, keepdim=True)
    g = g - g.mean(dim=-2, keepdim=True)
    k = z.shape[-2]
    joint = torch.cat([z, g], dim=-1)
    cov = joint.transpose(-1, -2) @ joint / max(k - 1, 1)
    lz = z.shape[-1]
    czz, cgg = cov[..., :lz, :lz], cov[..., lz:, lz:]
    rz = ridge * czz.diagonal(dim1=-2, dim2=-1).mean(-1) + 1e-12
    rg = ridge * cgg.diagonal(dim1=-2, dim2=-1).mean(-1) + 1e-12
    ridge_joint = torch.cat([rz[..., None].expand(*rz.shape, lz), rg[..., None].expand(*rg.shape, g.shape[-1])], dim=-1)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    ld_joint = torch.linalg.cholesky_ex(cov + ridge_joint[..., None] * eye)[0]
    ld_joint = ld_joint.diagonal(dim1=-2, dim2=-1).log().sum(-1) * 2
    return _logdet_ridge(czz, rz) + _logdet_ridge(cgg, rg) - ld_joint


def perturbed_class_scores(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    taps: Sequence[str],
    kind: Literal["trace_cov", "mutual_info"],
    copies: int,
    generator: torch.Generator,
    rotation_degrees: float = 5.0,
    noise_std: float = 0.01,
    ridge: float = 1e-4,
    batch_size: int = 64,
    max_rows: int = 4096,
) -> np.ndarray:
    """Per-class scores (N, C) over ``copies`` perturbed versions of each image; argmax gives the label.

    Each copy is rotated by an angle ~ N(0, rotation_degrees²) (converted to radians) and gets pixel noise
    N(0, noise_std²) on the normalised image; both are drawn from ``generator`` (CPU) per sample and copy.
    For every copy k and class c the Fisher score g_{k,c} (gradient of CE(·, c) w.r.t. the taps, pooled) is
    computed; all C at once per forward, one backward per class.

    - ``trace_cov``: score[c] = Σ_k Σ_l z_k[l]·g_{k,c}[l] (trace of the cross-covariance, uncentred as the
      paper's tr C_zg).
    - ``mutual_info``: score[c] = :func:`gaussian_mutual_information` of z and g_c over the K copies (full
      covariance; the reference's diagonal variant is identically zero and is not offered).

    Time: copies x (1 forward + C backward) per sample. Memory: O(N·C) outputs plus one block of
    ``max_rows`` perturbed images (and, for ``mutual_info``, their K·(C + 1)·L descriptors).
    """
    if kind not in ("trace_cov", "mutual_info"):
        raise ActivelabError(f"unknown perturbation estimator {kind!r}; use 'trace_cov' or 'mutual_info'")
    if copies < 2:
        raise ActivelabError(f"{kind} needs at least 2 perturbed copies; got {copies}")
    indices = np.asarray(indices, dtype=np.int64)
    device = model_device(model)
    sigma = math.radians(rotation_degrees)
    # images per block so that block x copies rows stay under max_rows
    per_block = max(1, min(batch_size, max_rows // copies))
    out: list[torch.Tensor] = []
    with eval_mode(model), TapCapture(model, taps) as hooks:
        for x, _ in iter_batches(dataset, indices, per_block):
            b = len(x)
            angles = torch.randn(copies, b, generator=generator) * sigma
            noise = torch.randn(copies, *x.shape, generator=generator) * noise_std
            xk = x.unsqueeze(0).expand(copies, *x.shape).reshape(copies * b, *x.shape[1:])
            xk = perturb(xk, angles.reshape(-1), noise.reshape(copies * b, *x.shape[1:])).to(device)
            with torch.enable_grad():
                xk.requires_grad_(True)
                logits = model(xk).float()
                acts = hooks.take()
                num_classes = logits.shape[1]
                z = torch.cat([pool_activation(a.detach()).float() for a in acts], 1).view(copies, b, -1)
                scores = torch.zeros(b, num_classes, dtype=torch.float64, device=device)
                g_all = []
                for c in range(num_classes):
                    target = torch.full((copies * b,), c, dtype=torch.int64, device=device)
                    loss = F.cross_entropy(logits, target, reduction="sum")
                    grads = torch.autograd.grad(loss, acts, retain_graph=c < num_classes - 1)
                    g = torch.cat([pool_activation(gr).float() for gr in grads], 1).view(copies, b, -1)
                    if kind == "trace_cov":
                        scores[:, c] = (z.double() * g.double()).sum(dim=(0, 2))
                    else:
                        g_all.append(g)
            if kind == "mutual_info":
                zt = z.transpose(0, 1)  # (b, K, L)
                gt = torch.stack(g_all, 0).permute(0, 2, 1, 3)  # (C, b, K, L)
                scores = gaussian_mutual_information(zt.unsqueeze(0), gt, ridge).transpose(0, 1)
            out.append(scores.cpu())
    return torch.cat(out).numpy()
