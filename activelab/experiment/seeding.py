"""Every random stream of an experiment derives from (seed, run, purpose...) so that any round can be recomputed
alone, in any process, in any order: the basis of resuming with identical results."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def _words(*keys: object) -> list[int]:
    out = []
    for key in keys:
        if isinstance(key, (int, np.integer)):
            out.append(int(key) & 0xFFFFFFFF)
        else:
            out.append(int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:4], "little"))
    return out


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *_words(*keys)]))


def torch_generator(seed: int, *keys: object) -> torch.Generator:
    value = int(numpy_rng(seed, *keys).integers(2**62))
    return torch.Generator().manual_seed(value)


def torch_seed(seed: int, *keys: object) -> int:
    return int(numpy_rng(seed, *keys).integers(2**62))
