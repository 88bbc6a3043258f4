"""Validation of index arguments given by users (``select(labeled=...)``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ActivelabError


def as_pool_indices(value: Sequence[int] | np.ndarray | None, pool_size: int, name: str = "labeled") -> np.ndarray:
    """``value`` as sorted-free int64 pool indices, checked.

    Accepts None or an empty sequence (no index), a sequence or array of integers in ``[0, pool_size)`` without
    repeats, or a boolean mask of length ``pool_size`` (True = in the set). Anything else (floats, even whole
    ones; a mask of another length; repeated indices; out-of-range values; several dimensions) raises an
    :class:`ActivelabError` saying what was expected. The order of an index list is kept.
    """
    if value is None:
        return np.zeros(0, dtype=np.int64)
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ActivelabError(f"{name} must be a 1-D list of pool indices or a boolean mask; got shape {arr.shape}")
    if arr.dtype == bool:
        if len(arr) != pool_size:
            raise ActivelabError(
                f"{name} is a boolean mask of length {len(arr)} but the pool has {pool_size} samples: give a mask "
                "of the pool's length, or a list of indices"
            )
        return np.flatnonzero(arr).astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ActivelabError(
            f"{name} must hold integer pool indices (or be a boolean mask); got dtype {arr.dtype}: "
            "convert with np.asarray(..., dtype=np.int64) if the values are whole numbers"
        )
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= pool_size:
        raise ActivelabError(f"{name} indices must lie in [0, {pool_size}); got {arr.min()}..{arr.max()}")
    uniq, counts = np.unique(arr, return_counts=True)
    if len(uniq) != len(arr):
        dupes = uniq[counts > 1][:5].tolist()
        raise ActivelabError(f"{name} holds repeated indices (e.g. {dupes}): give each pool index once")
    return arr
