"""Values made JSON-able for records (round notes, stored lists): shared by the query engine and the store."""

from __future__ import annotations

from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """``value`` made JSON-able: numpy and torch scalars/arrays become numbers/lists, containers are walked,
    anything else becomes its repr (a strategy's round info must never kill the job that computed it)."""
    if value is None or isinstance(value, (bool, str, int, float)):
        return value  # NaN is kept (written as NaN, as Python's json reads it back)
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if type(value).__module__.startswith("torch") and hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    return repr(value)
