"""Speed of the inference paths on a CUDA device (run by ``benchmarks/gpu.sh``; sizes fit a few minutes on one
modern GPU). Each section prints a table and writes it under ``benchmarks/results/gpu/``:

- ``forward.txt``: one forward pass over a LeNet pool (float32 and float16 autocast), batch sizes by device
  memory (:func:`activelab.inference.device.probe_batch_size`), vs the same pass on the CPU (a sample of it).
- ``mc.txt``: ``var_ratio`` with the default K = 128 MC-dropout passes, over one forward pass.
- ``gradnorm.txt``: entropy-gradient norms, batched (layer signals) vs the per-sample autograd loop (the >= 20x
  target is a GPU target), and their agreement.
- ``strategies.txt``: core-set, BADGE and margin selection times on the device.

    python benchmarks/bench_gpu.py --section forward          # one section
    python benchmarks/bench_gpu.py --n 200000 --device cuda:0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "results" / "gpu"


def timed(fn, device, repeats: int = 3):
    """(result, fastest wall seconds) of ``fn()``, synchronising the device around each call."""
    import torch

    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return out, best


def lenet_pool(n: int, seed: int = 0):
    import torch

    from activelab.data.arrays import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return ArrayDataset(x, y, mean=[0.5], std=[0.25])


def lenet(device):
    import torch

    from activelab.models.lenet import LeNet

    torch.manual_seed(0)
    return LeNet(10, 1, 28, dropout=True).to(device).eval()


def header(args, what: str) -> list[str]:
    import torch

    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    return [f"bench_gpu {what}: device {args.device} ({name}), torch {torch.__version__}", ""]


def section_forward(args) -> str:
    import numpy as np
    import torch

    from activelab.inference.device import half_precision, probe_batch_size
    from activelab.inference.forward import forward_pass

    pool, model = lenet_pool(args.n), lenet(args.device)
    idx = np.arange(args.n)
    batch = probe_batch_size(model, pool[0][0], share=0.25, maximum=16384)
    lines = header(args, "forward") + [f"LeNet, n = {args.n:,}, batch {batch} (probe_batch_size, 25% of free memory)"]
    full, t32 = timed(lambda: forward_pass(model, pool, idx, batch).logits, args.device)
    with half_precision():
        half, t16 = timed(lambda: forward_pass(model, pool, idx, batch).logits, args.device)
    cpu_n = min(args.n, 20000)
    cpu_model = lenet(torch.device("cpu"))
    _, tcpu = timed(lambda: forward_pass(cpu_model, pool, idx[:cpu_n], 512), torch.device("cpu"), repeats=1)
    agree = float((full.argmax(1) == half.argmax(1)).mean())
    lines += [
        f"  float32 {t32:8.3f} s  ({args.n / t32:,.0f} samples/s)",
        f"  float16 {t16:8.3f} s  ({args.n / t16:,.0f} samples/s); argmax agreement with float32 {agree:.4f}; "
        f"max |logit diff| {np.abs(full - half).max():.3g}",
        f"  cpu (1 process, batch 512, {cpu_n:,} samples) {tcpu * args.n / cpu_n:8.3f} s extrapolated to n",
    ]
    return "\n".join(lines)


def section_mc(args) -> str:
    import numpy as np

    import activelab
    from activelab.inference.forward import forward_pass

    n = min(args.n, args.mc_n)
    pool, model = lenet_pool(n), lenet(args.device)
    _, tf = timed(lambda: forward_pass(model, pool, np.arange(n), 4096), args.device)
    labeled = np.arange(100)
    lines = header(args, "mc") + [f"var_ratio, K = 128 MC-dropout passes, LeNet, n = {n:,}"]
    for batch in (512, 4096):
        _, t = timed(
            lambda b=batch: activelab.select(
                "var_ratio", model, pool, labeled=labeled, budget=100, device=args.device, batch_size=b
            ),
            args.device,
            repeats=1,
        )
        lines.append(f"  batch {batch:5d}: {t:8.2f} s = {t / tf:6.1f}x one forward pass ({tf:.3f} s)")
    return "\n".join(lines)


def section_gradnorm(args) -> str:
    import numpy as np

    from activelab.inference.gradients import entropy_gradient_norms, entropy_gradient_norms_loop

    pool, model = lenet_pool(args.grad_n), lenet(args.device)
    model.eval()
    idx = np.arange(args.grad_n)
    loop_n = min(args.grad_n, 500)
    lines = header(args, "gradnorm") + [
        f"entropy-gradient norms (per_tensor_sum), LeNet, {args.grad_n:,} samples (loop timed on {loop_n})"
    ]
    batched, tb = timed(lambda: entropy_gradient_norms(model, pool, idx), args.device)
    loop, tl = timed(lambda: entropy_gradient_norms_loop(model, pool, idx[:loop_n]), args.device, repeats=1)
    tl_full = tl * args.grad_n / loop_n
    rel = np.abs(batched[:loop_n] - loop).max() / np.abs(loop).max()
    lines += [
        f"  batched (signals) {tb:8.3f} s; loop {tl_full:8.2f} s (extrapolated): {tl_full / tb:6.1f}x (target >= 20x)",
        f"  max relative difference to the loop: {rel:.2e}",
    ]
    return "\n".join(lines)


def section_strategies(args) -> str:
    import numpy as np

    import activelab

    n = min(args.n, args.strategy_n)
    pool, model = lenet_pool(n), lenet(args.device)
    labeled = np.arange(1000)
    lines = header(args, "strategies") + [f"LeNet, n = {n:,}, 1,000 labeled, budget 1,000"]
    for name in ("margin", "coreset", "badge"):
        _, t = timed(
            lambda s=name: activelab.select(
                s, model, pool, labeled=labeled, budget=1000, device=args.device, batch_size=4096
            ),
            args.device,
            repeats=1,
        )
        lines.append(f"  {name:<8} {t:8.2f} s")
    return "\n".join(lines)


SECTIONS = {
    "forward": section_forward,
    "mc": section_mc,
    "gradnorm": section_gradnorm,
    "strategies": section_strategies,
}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append")
    parser.add_argument("--n", type=int, default=200_000, help="pool size of the forward pass")
    parser.add_argument("--mc-n", type=int, default=50_000, help="pool size of the MC section")
    parser.add_argument("--grad-n", type=int, default=5_000, help="samples of the gradient-norm section")
    parser.add_argument("--strategy-n", type=int, default=100_000, help="pool size of the strategy section")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here (pass --device cpu to run the same sections on the CPU)")
    from _measure import write_results

    for name in args.section or list(SECTIONS):
        write_results(SECTIONS[name](args), Path(args.out) / f"{name}.txt")


if __name__ == "__main__":
    main()
