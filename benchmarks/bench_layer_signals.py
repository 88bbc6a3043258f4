"""Layer signals per layer kind: the batched closed forms vs the per-sample loop and the floor (issue 13, part 6).

    OMP_NUM_THREADS=1 python benchmarks/bench_layer_signals.py | tee benchmarks/results/bench_layer_signals.txt

For each layer kind a small model in which that kind carries most of the work (28x28 single-channel inputs,
10 classes, random weights, the classifier scaled so that predictions are not uniform), single-threaded, CPU
seconds (process time: with one thread that is the work done, much less disturbed than wall time when other
jobs share the CPU), all methods interleaved in one process and the whole set repeated ``--repeats`` times:

- ``fwd``: one plain forward pass over the ``--n`` samples (batch 512, no gradients);
- gradient norms (``entropy_gradient_norms``, per-tensor sum, layer signals) vs the per-sample autograd loop
  (``entropy_gradient_norms_loop``, on ``--loop-n`` samples, scaled) and the floor: one forward and one
  backward pass per chunk of the summed entropy to the layers' outputs, nothing else;
- Fisher embeddings (``masked_fisher_embeddings``, layer signals) on a mask of the whole classifier weight and
  a random ``--mask-pct`` of every other tensor (or, with ``--mask fisher``, the mask FisherMask itself builds:
  the whole classifier weight and the largest entries of the diagonal Fisher of 256 pool samples, ``--mask-pct``
  of all parameters in all), vs the per-sample loop (one forward and C backward passes per
  sample, on ``--loop-n`` samples, scaled) and the floor: one forward and C backward passes per chunk to the
  masked layers' outputs, as the issue defines it (the signal method runs C - 1 of them before its closed
  forms: sum_c p_c d log p_c = 0 gives each sample's most probable class from the others).

Chunks: 256 samples for the gradient norms and 32 for the Fisher embeddings by default, the largest the
automatic choices take (``--chunk``, ``--fisher-chunk``; each floor runs at its method's chunk).

``ceiling`` = loop / floor: what an exact batched method built on backpropagation can reach at best;
``share`` = (loop / batched) / ceiling = floor / batched, the share of the ceiling the method reaches
(target: >= 0.5). The floor stops at the layers' outputs, so it leaves out the parameters' gradients that a
batched backward pass also computes (a Linear's weight gradient costs about what its input gradient does);
``step`` is that ordinary batched forward + backward pass (the same objectives, gradients w.r.t. every
parameter for the norms and w.r.t. the masked tensors for Fisher, summed over the batch), and ``share of
step`` = step / batched the share of the ceiling loop / step. Every table cell is the median of the repeats
with the range (min-max) beside it.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
from _measure import backward_to_outputs, backward_to_params, clock, write_results
from bench_fisher_embeddings import loop_embeddings
from torch import nn

from activelab.data.arrays import ArrayDataset, iter_batches
from activelab.inference.fisher import FisherMask, diagonal_fisher, fisher_mask, masked_fisher_embeddings
from activelab.inference.forward import forward_pass
from activelab.inference.gradients import entropy, entropy_gradient_norms, entropy_gradient_norms_loop
from activelab.inference.signals import plan_signal_layers


class BatchNormNet(nn.Module):
    """Three 3x3 convolutions (16, 32, 32 channels, no bias) each followed by BatchNorm2d, at 28, 28, 14 px."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean(dim=(2, 3)))


class GroupedNet(nn.Module):
    """A 3x3 stem, then 3x3 convolutions with 4 and 8 groups (8 and 4 channels per group)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1, groups=8)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c2(torch.relu(self.c1(x)))), 2)
        return self.fc(torch.relu(self.c3(x)).mean(dim=(2, 3)))


class DepthwiseNet(nn.Module):
    """MobileNet-style blocks: depthwise 3x3 then pointwise 1x1, at 28 and 14 px."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.dw1, self.pw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1)
        self.dw2, self.pw2 = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.pw1(torch.relu(self.dw1(torch.relu(self.stem(x))))))
        x = torch.max_pool2d(x, 2)
        return self.fc(torch.relu(self.pw2(torch.relu(self.dw2(x)))).mean(dim=(2, 3)))


class LayerNormNet(nn.Module):
    """Patches of 4x4 pixels as 49 tokens: Linear + LayerNorm per token, twice, mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.e, self.n1 = nn.Linear(16, 64), nn.LayerNorm(64)
        self.h, self.n2 = nn.Linear(64, 64), nn.LayerNorm(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        t = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(x.shape[0], 49, 16)
        t = torch.relu(self.n1(self.e(t)))
        return self.fc(torch.relu(self.n2(self.h(t))).mean(dim=1))


class Conv1dNet(nn.Module):
    """Image rows as a sequence of 28 steps with 28 channels: Conv1d 5 (32), Conv1d 5 (32), grouped Conv1d 3."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(28, 32, 5, padding=2)
        self.c2 = nn.Conv1d(32, 32, 5, padding=2)
        self.c3 = nn.Conv1d(32, 32, 3, padding=1, groups=4)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x[:, 0]))))
        return self.fc(torch.relu(self.c3(h)).mean(dim=2))


class EmbeddingNet(nn.Module):
    """The 196 pixels of a 14x14 downsampled image as tokens (32 grey levels, padding_idx 0) plus a position
    embedding, then a Linear per token and the mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(32, 32, padding_idx=0)
        self.pos = nn.Embedding(196, 32)
        self.h = nn.Linear(32, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        # (B, 196) normalised pixels, in float32 whatever the model's dtype: the float64 reference loop sees
        # the same tokens
        grey = torch.nn.functional.avg_pool2d(x.float(), 2).flatten(1)
        tokens = ((grey + 1.0) * 12).long().clamp(0, 31)
        h = self.tok(tokens) + self.pos(torch.arange(196, device=x.device).expand_as(tokens))
        return self.fc(torch.relu(self.h(h)).mean(dim=1))


MODELS = {
    "batchnorm": BatchNormNet,
    "grouped_conv": GroupedNet,
    "depthwise_conv": DepthwiseNet,
    "layernorm": LayerNormNet,
    "conv1d": Conv1dNet,
    "embedding": EmbeddingNet,
}


class Float64:
    """``dataset``'s batches in float64 (the reference loops' input)."""

    def __init__(self, dataset: ArrayDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices):
        x, y = self.dataset.batch(indices)
        return x.double(), y


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[kind]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        model.fc.weight.mul_(4)
    return model.eval()


def pool(n: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return ArrayDataset(x, torch.randint(0, 10, (n,), generator=g), [0.5], [0.3])


def random_mask(model: nn.Module, pct: float, seed: int = 0) -> FisherMask:
    rng = np.random.default_rng(seed)
    names, indices = [], []
    for name, p in model.named_parameters():
        k = p.numel() if name == "fc.weight" else max(1, int(pct * p.numel()))
        names.append(name)
        indices.append(torch.as_tensor(np.sort(rng.choice(p.numel(), k, replace=False))))
    return FisherMask(tuple(names), tuple(indices), "fc.weight", False)


def fishers_mask(model: nn.Module, data, pct: float) -> FisherMask:
    """The mask FisherMask builds (:func:`fisher_mask` on the diagonal Fisher of the first 256 samples)."""
    return fisher_mask(diagonal_fisher(model, data, np.arange(256)), "fc.weight", pct)


def signal_modules(model: nn.Module, data, names) -> list[nn.Module]:
    """The modules the signal method differentiates at (checked: nothing goes to the fallback)."""
    params = dict(model.named_parameters())
    probe, _ = data.batch(np.arange(2))
    layers, fallback = plan_signal_layers(model, {n: torch.arange(params[n].numel()) for n in names}, probe)
    if fallback:
        raise SystemExit(f"not covered by the signal method: {fallback}")
    return [layer.module for layer in layers]


def step(model, data, idx, names, chunk, objectives) -> None:
    """The batched forward and backward passes with the parameters' gradients (of the tensors ``names``)."""
    params = [p for n, p in model.named_parameters() if n in set(names)]
    for x, _ in iter_batches(data, idx, chunk):
        backward_to_params(model, x, params, objectives)


def floor(model, data, idx, modules, chunk, objectives) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for x, _ in iter_batches(data, idx, chunk):
            backward_to_outputs(model, x, modules, objectives)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def measure(kind: str, args) -> dict[str, list[float]]:
    model, data = build(kind), pool(args.n)
    idx, loop_idx = np.arange(args.n), np.arange(args.loop_n)
    mask = random_mask(model, args.mask_pct) if args.mask == "random" else fishers_mask(model, data, args.mask_pct)
    all_names = [n for n, _ in model.named_parameters()]
    all_modules = signal_modules(model, data, all_names)
    mask_modules = signal_modules(model, data, mask.names)
    scale = args.n / args.loop_n

    def entropy_sum(z):
        return [entropy(z).sum()]

    def class_sums(z):
        return list(torch.log_softmax(z, dim=1).sum(dim=0))

    jobs = {
        "fwd": lambda: forward_pass(model, data, idx, 512),
        "norm_batched": lambda: entropy_gradient_norms(model, data, idx, chunk_size=args.chunk),
        "norm_floor": lambda: floor(model, data, idx, all_modules, args.chunk, entropy_sum),
        "norm_step": lambda: step(model, data, idx, all_names, args.chunk, entropy_sum),
        "norm_loop": lambda: entropy_gradient_norms_loop(model, data, loop_idx),
        "fisher_batched": lambda: masked_fisher_embeddings(model, data, idx, mask, chunk_size=args.fisher_chunk),
        "fisher_floor": lambda: floor(model, data, idx, mask_modules, args.fisher_chunk, class_sums),
        "fisher_step": lambda: step(model, data, idx, mask.names, args.fisher_chunk, class_sums),
        "fisher_loop": lambda: loop_embeddings(model, data, loop_idx, mask),
    }
    for job in jobs.values():  # warm-up
        job()
    # correctness on the loop's samples: the float32 results against the loop in float64 (a float32 loop runs
    # each sample alone, and its rounding can flip a ReLU whose input is within float32 precision of zero,
    # which moves that sample's gradient far more than the methods' own rounding does)
    norms = entropy_gradient_norms(model, data, loop_idx, chunk_size=args.chunk)
    emb = masked_fisher_embeddings(model, data, loop_idx, mask, chunk_size=args.fisher_chunk)
    model64, data64 = copy.deepcopy(model).double(), Float64(data)
    loop_norms = entropy_gradient_norms_loop(model64, data64, loop_idx)
    loop_emb = loop_embeddings(model64, data64, loop_idx, mask)
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(args.repeats):
        for key, job in jobs.items():
            _, cpu, _ = clock(job)
            times[key].append(cpu * (scale if key.endswith("loop") else 1.0))
    times["norm_err"] = [float(np.max(np.abs(norms - loop_norms) / np.abs(loop_norms)))]
    times["fisher_err"] = [float(np.abs(emb - loop_emb).max() / np.abs(loop_emb).max())]
    times["params"] = [sum(p.numel() for p in model.parameters())]
    times["mask"] = [mask.size]
    return times


def cell(values: list[float]) -> str:
    v = np.asarray(values)
    return f"{np.median(v):5.2f} ({v.min():.2f}-{v.max():.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default=",".join(MODELS), help="comma-separated layer kinds")
    parser.add_argument("--n", type=int, default=1024, help="samples of the batched methods and floors")
    parser.add_argument("--loop-n", type=int, default=128, help="samples the loops run on (scaled to --n)")
    parser.add_argument("--chunk", type=int, default=256, help="chunk of the gradient norms and their floor")
    parser.add_argument("--fisher-chunk", type=int, default=32, help="chunk of the Fisher embeddings and floor")
    parser.add_argument("--mask", choices=("random", "fisher"), default="random", help="which Fisher mask")
    parser.add_argument(
        "--mask-pct", type=float, default=0.05, help="random: share of each non-classifier tensor; fisher: pct"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/bench_layer_signals.txt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    mask_text = (
        f"classifier weight + {args.mask_pct:.0%} of every other tensor"
        if args.mask == "random"
        else f"FisherMask's (whole classifier weight + top diagonal Fisher entries), K = {args.mask_pct:.0%} of P"
    )
    lines = [
        f"# OMP_NUM_THREADS=1 python benchmarks/bench_layer_signals.py {' '.join(sys.argv[1:])}".rstrip(),
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at start {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f} on {os.cpu_count()} cores; 1 torch thread, CPU seconds",
        f"# n = {args.n} (loops on {args.loop_n}, scaled), chunk {args.chunk} (Fisher {args.fisher_chunk}), "
        f"Fisher mask: {mask_text}, C = 10; median (min-max) of {args.repeats} repeats",
        "# ratios: x fwd = seconds / one forward pass; speedup = loop / batched; ceiling = loop / floor; "
        "share = floor / batched (target >= 0.5); step: the batched forward + backward passes with the "
        "parameters' gradients (share of step = step / batched); max rel err: the float32 results vs the "
        "per-sample loop in float64 on the loop's samples (norms: worst sample; Fisher: worst entry / largest)",
    ]
    header = (
        f"{'layer kind':<15}{'params':>7} {'what':<7}{'batched x fwd':>21}{'floor x fwd':>21}{'loop x fwd':>23}"
        f"{'speedup':>21}{'ceiling':>21}{'share':>21}{'step x fwd':>21}{'share of step':>21}{'max rel err':>12}"
    )
    lines += [header, "-" * len(header)]
    print("\n".join(lines), flush=True)
    for kind in args.kinds.split(","):
        t = measure(kind, args)
        fwd = np.asarray(t["fwd"])
        for what in ("norm", "fisher"):
            b, f, lp, st = (np.asarray(t[f"{what}_{s}"]) for s in ("batched", "floor", "loop", "step"))
            row = (
                f"{kind:<15}{int(t['params'][0]):>7} {what:<7}{cell(b / fwd):>21}{cell(f / fwd):>21}"
                f"{cell(lp / fwd):>23}{cell(lp / b):>21}{cell(lp / f):>21}{cell(f / b):>21}"
                f"{cell(st / fwd):>21}{cell(st / b):>21}{t[f'{what}_err'][0]:>12.1e}"
            )
            lines.append(row)
            print(row, flush=True)
    write_results("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
