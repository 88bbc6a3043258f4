"""MC-dropout (and ensemble) uncertainty: variation ratio, BALD, entropy of the mean, mean std.

Baselines of the FK paper (CVPR 2020, sec. 5): Gal et al. 2017 ("Deep Bayesian active learning with image
data") and Beluch et al. 2018 (ensembles). Scores are pure functions of
:class:`~activelab.inference.mc.MCStatistics`, which K stochastic passes (per ensemble member) stream into
O(N·C) accumulators.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ..errors import ActivelabError
from ..mcstats import MCStatistics, entropy
from .base import ScoreStrategy, StrategyParams, register


def variation_ratio(stats: MCStatistics) -> np.ndarray:
    """1 - max_c freq_c, freq_c = fraction of the T passes whose argmax is c."""
    return 1.0 - stats.counts.max(axis=1) / stats.passes


def mean_entropy_score(stats: MCStatistics) -> np.ndarray:
    """H(mean_t p_t): entropy of the averaged prediction (natural log)."""
    return entropy(stats.prob_sum / stats.passes)


def bald(stats: MCStatistics) -> np.ndarray:
    """H(mean_t p_t) - mean_t H(p_t): mutual information between prediction and weights (>= 0)."""
    return mean_entropy_score(stats) - stats.entropy_sum / stats.passes


def mean_std(stats: MCStatistics) -> np.ndarray:
    """mean_c std_t p_t(c), with the sample std (ddof = 1) as the reference's ``torch.std``; needs T >= 2."""
    t = stats.passes
    if t < 2:
        raise ActivelabError("mean_std needs at least 2 stochastic passes (mc_samples x ensemble >= 2)")
    var = (stats.prob_sq_sum - stats.prob_sum**2 / t) / (t - 1)
    return np.sqrt(np.clip(var, 0.0, None)).mean(axis=1)


class MCParams(StrategyParams):
    mc_samples: int = Field(128, ge=1, description="K: stochastic passes per ensemble member")
    ensemble: int = Field(1, ge=1, description="E: ensemble members (see the class docstring)")


class _MCStrategy(ScoreStrategy):
    """Top-b of an MC-dropout score over T = E·K stochastic passes.

    Ensembles: the paper's E = 4 are four separately trained models whose votes are pooled. The experiment
    runner trains them (``ensemble_size`` = E; members share the run's initial weights, each with its own
    classifier head and training seeds) and passes them as ``ctx.ensemble_models``, K passes each. Without
    them (``activelab.select`` gets one model) E > 1 means E independently seeded families of K dropout masks
    of the one model, i.e. E·K MC-dropout passes.

    Complexity: E·K forward passes over the N candidates; O(N·C) memory (streamed accumulators, never
    N x K x C). Deviation from the authors' code: the ensemble entropy is taken of the averaged probability
    (the reference summed the members' means without dividing by E).
    """

    Params = MCParams
    first_round_random = True
    example_params = {"mc_samples": 3}

    def ensemble_size(self) -> int:
        """E: the experiment runner trains E models per round and passes them as ``ctx.ensemble_models``."""
        return self.params.ensemble

    @staticmethod
    def score(stats: MCStatistics) -> np.ndarray:
        raise NotImplementedError

    def scores(self, ctx, rng):
        p: MCParams = self.params
        seed = int(rng.integers(2**31 - 1))
        return self.score(ctx.mc_statistics(p.mc_samples, p.ensemble, seed))


@register
class VariationRatio(_MCStrategy):
    __doc__ = "Variation ratio 1 - max_c freq_c of MC-dropout votes (FK paper's varR baseline).\n\n" + (
        _MCStrategy.__doc__ or ""
    )
    name = "var_ratio"
    score = staticmethod(variation_ratio)


@register
class BALD(_MCStrategy):
    __doc__ = "BALD (Houlsby et al. 2011; Gal et al. 2017): H(mean p) - mean H(p).\n\n" + (_MCStrategy.__doc__ or "")
    name = "bald"
    score = staticmethod(bald)


@register
class MCEntropy(_MCStrategy):
    __doc__ = "Entropy of the MC-dropout mean prediction (Gal et al. 2017).\n\n" + (_MCStrategy.__doc__ or "")
    name = "mc_entropy"
    score = staticmethod(mean_entropy_score)


@register
class MeanSTD(_MCStrategy):
    __doc__ = "Mean over classes of the std of p across MC passes (Kampffmeyer et al. 2016).\n\n" + (
        _MCStrategy.__doc__ or ""
    )
    name = "mean_std"
    score = staticmethod(mean_std)
