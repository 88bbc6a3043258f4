"""Device placement of inference passes: batch moves, chunk sizes from the device's free memory, and optional
half precision.

- :func:`resolve_device`: a device name checked against what this machine has.
- :func:`to_device`: a batch to the model's device (CUDA copies from pinned host memory run asynchronously).
- :func:`free_memory_bytes` / :func:`rows_that_fit`: how many rows of a given size fit in a share of the
  device's free memory (CUDA: ``torch.cuda.mem_get_info``; CPU: the memory the kernel reports available), so a
  pass never holds a whole-pool tensor on the device.
- :func:`probe_batch_size`: the batch size of a model's inference pass that fits a share of a CUDA device's free
  memory, from the peak memory of one small probe batch.
- :func:`half_precision` / :func:`inference_autocast`: inference passes (forward and MC-dropout passes) in
  float16 autocast on CUDA, on request; a no-op on CPU, where float16 matmuls are slow. Outputs are float32.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

_HALF = contextvars.ContextVar("activelab_half_precision", default=False)


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device; asking for CUDA where there is none is a clear error."""
    from ..errors import ActivelabError

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ActivelabError("device='cuda' was asked for but CUDA is not available here; use device='cpu'")
    return device


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``; a host tensor bound for CUDA is pinned and copied without blocking the host."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory of ``device`` in bytes (CUDA: free on the device; CPU: available RAM), or None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    from ..memory import available_memory_bytes

    return available_memory_bytes()


def rows_that_fit(
    device: torch.device | str,
    bytes_per_row: int,
    share: float = 0.25,
    minimum: int = 1,
    maximum: int = 1 << 20,
    default: int = 4096,
) -> int:
    """How many rows of ``bytes_per_row`` fit in ``share`` of ``device``'s free memory, within
    [``minimum``, ``maximum``]; ``default`` when the free memory is unknown."""
    if bytes_per_row <= 0:
        raise ValueError("bytes_per_row must be positive")
    free = free_memory_bytes(device)
    if free is None:
        return max(minimum, min(maximum, default))
    return int(max(minimum, min(maximum, (free * share) // bytes_per_row)))


def probe_batch_size(
    model: nn.Module, sample: torch.Tensor, share: float = 0.25, probe: int = 64, maximum: int = 1 << 16
) -> int:
    """The inference batch size of ``model`` that fits ``share`` of its CUDA device's free memory: the peak
    memory of one no-grad forward of ``probe`` copies of ``sample`` (one input, without the batch dimension),
    scaled. On CPU: a batch whose input alone takes at most 64 MiB (CPU passes gain nothing from bigger ones)."""
    from ..models.introspection import model_device

    device = model_device(model)
    if device.type != "cuda":
        return int(max(1, min(maximum, (64 << 20) // max(1, sample.numel() * sample.element_size()))))
    x = to_device(sample.unsqueeze(0).expand(probe, *sample.shape).contiguous(), device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad(), inference_autocast(device):
        model(x)
    torch.cuda.synchronize(device)
    per_row = max(1, (torch.cuda.max_memory_allocated(device) - before) // probe)
    return rows_that_fit(device, per_row, share, minimum=1, maximum=maximum)


@contextlib.contextmanager
def half_precision(enabled: bool = True) -> Iterator[None]:
    """Within this block, inference passes on CUDA run in float16 autocast (``with half_precision():
    activelab.select(...)``). Scores then differ from float32 in the low digits, so ties and near-ties may
    pick differently; training is never affected."""
    token = _HALF.set(enabled)
    try:
        yield
    finally:
        _HALF.reset(token)


def half_precision_enabled() -> bool:
    return _HALF.get()


def inference_autocast(device: torch.device | str):
    """The autocast context of an inference pass on ``device``: float16 on CUDA inside :func:`half_precision`,
    else a no-op."""
    device = torch.device(device)
    if _HALF.get() and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@contextmanager
def seeded_torch(seed: int, devices: Sequence[torch.device | int] = ()) -> Iterator[None]:
    """Seed torch's CPU generator and the given (initialised) CUDA devices' generators, and restore them all on
    exit. Unlike ``torch.manual_seed`` it never queues a seed for CUDA devices not initialised yet (that would
    replace the caller's own queued seed and outlive the block)."""
    devices = list(devices)
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(int(seed))
        for d in devices:
            index = d if isinstance(d, int) else (d.index if d.index is not None else torch.cuda.current_device())
            torch.cuda.default_generators[index].manual_seed(int(seed))
        yield
