"""Which embeddings the label-free strategies (TypiClust, ProbCover) work on, L2-normalised as their authors do."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from ..errors import ActivelabError
from ..neighbors import l2_normalize
from .base import StrategyParams

if TYPE_CHECKING:
    from ..query.context import QueryContext


class EmbeddingParams(StrategyParams):
    embedding: Literal["model", "user"] = Field(
        "model",
        description="'model': the model's penultimate features (the rotation-pretrained backbone at the first "
        "round of an experiment with init: rotation); 'user': the embeddings passed to select(..., embeddings=...)",
    )
    subset: int | None = Field(
        None, ge=1, description="random candidates considered (None: all); as the subsample wrapper"
    )


def embedding_inputs(ctx: QueryContext, which: str) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised (candidates, labeled) embeddings: the model's or the user's."""
    if which == "user":
        cand = ctx.user_embeddings("candidates")
        if cand is None:
            raise ActivelabError(
                f"{ctx.strategy_name}: embedding='user' needs embeddings: pass select(..., embeddings=array over the "
                "whole pool), or use embedding='model'"
            )
        lab = ctx.user_embeddings("labeled") if len(ctx.labeled) else np.zeros((0, cand.shape[1]), np.float32)
    else:
        cand = ctx.embeddings("candidates")
        lab = ctx.embeddings("labeled") if len(ctx.labeled) else np.zeros((0, cand.shape[1]), np.float32)
    return l2_normalize(cand), l2_normalize(lab)
