"""Per-round classification metrics and per-curve summaries; they live in :mod:`activelab.metrics` (below both
the experiment runner and the reports) and are re-exported here."""

from __future__ import annotations

from ..metrics import aubc, labels_to_target, round_metrics

__all__ = ["aubc", "labels_to_target", "round_metrics"]
