"""``activelab plot``: every figure of an experiment directory, from the store (and saved models for t-SNE)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ActivelabError
from ..experiment.layout import Layout
from ..experiment.runner import load_experiment
from .curves import plot_learning_curves
from .summary import summarize


def draw_figures(
    exp_dir: str | Path,
    *,
    out: str | Path | None = None,
    strategies: Sequence[str] | None = None,
    target: float | None = None,
    highlight: str | None = None,
    versus: Sequence[str] | None = None,
    reference: float | None = None,
    confusion_round: int | None = None,
    tsne_round: int | None = None,
    run: int = 0,
    tsne_space: str = "features",
    tsne_samples: int = 2000,
) -> list[Path]:
    exp_dir = Path(exp_dir)
    cfg, store = load_experiment(exp_dir)
    out_dir = Path(out) if out else Layout(exp_dir).figures
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        store.close()
        raise ActivelabError(f"cannot write figures to {out_dir} ({exc}): pass --out with a writable folder") from None
    try:
        summaries = summarize(cfg, store, target)
        for named in (strategies, versus, [highlight] if highlight else None):
            unknown = [s for s in named or [] if s not in summaries]
            if unknown:
                raise ActivelabError(f"unknown strategies {unknown}; this experiment has: {', '.join(summaries)}")
        runs = store.runs()
        pool_size = float(np.mean([r["pool_size"] for r in runs.values()])) if runs else None
        target = target if target is not None else cfg.loop.target_accuracy
        files = plot_learning_curves(
            summaries,
            out_dir / "learning_curves",
            title=cfg.name,
            pool_size=pool_size,
            reference=reference if reference is not None else cfg.full_pool_accuracy,
            target=target,
            highlight=highlight,
            strategies=strategies,
            versus=versus,
        )
        keys = list(strategies) if strategies else list(summaries)
        if confusion_round is not None:
            files += _confusion(cfg, store, keys, confusion_round, run, runs, out_dir)
        if tsne_round is not None:
            files += _tsne(exp_dir, cfg, store, keys, tsne_round, run, tsne_space, tsne_samples, out_dir)
        return files
    finally:
        store.close()


def _test_labels(cfg) -> tuple[np.ndarray, list[str]]:
    from ..data.arrays import dataset_labels
    from ..experiment.setup import load_data

    _, test = load_data(cfg.dataset)
    classes = getattr(test, "classes", None) or [str(c) for c in range(int(dataset_labels(test).max()) + 1)]
    return dataset_labels(test), list(classes)


def _round_record(store, run: int, key: str, round_: int):
    recs = [r for r in store.rounds(run=run, strategy=key) if r.round == round_]
    if not recs:
        raise ActivelabError(f"run {run} of {key} has no completed round {round_}")
    return recs[0]


def _confusion(cfg, store, keys, round_, run, runs, out_dir) -> list[Path]:
    from .confusion import plot_confusion_matrices

    y_true, classes = _test_labels(cfg)
    panels = [(key, y_true, _round_record(store, run, key, round_).test_predictions) for key in keys]
    minority = runs.get(run, {}).get("minority", []) if runs else []
    return plot_confusion_matrices(panels, classes, minority, out_dir / f"confusion_round{round_}_run{run}")


def _tsne(exp_dir, cfg, store, keys, round_, run, space, samples, out_dir) -> list[Path]:
    import torch

    from ..experiment.setup import load_data, new_model, prepare_run
    from ..inference.forward import forward_pass
    from ..strategies.base import get_strategy
    from ..train import get_trainer
    from .tsne import plot_tsne

    _, test = load_data(cfg.dataset)
    y_true, class_names = _test_labels(cfg)
    idx = np.sort(np.random.default_rng(0).choice(len(y_true), min(samples, len(y_true)), replace=False))
    data = prepare_run(cfg, run)
    files: list[Path] = []
    by_label = {s.label: s for s in cfg.strategies}
    for key in keys:
        rec = _round_record(store, run, key, round_)
        preds = rec.test_predictions[idx]
        if space == "pixels":
            from ..data.arrays import iter_batches

            feats = np.concatenate([x.flatten(1).numpy() for x, _ in iter_batches(test, idx, 1024)])
        else:
            path = Layout(exp_dir).checkpoint(run, key, round_)
            if not path.exists():
                raise ActivelabError(
                    f"no saved model for {key} run {run} round {round_} ({path}); "
                    "set loop.keep_checkpoints: all, or use --tsne-space pixels"
                )
            model = new_model(cfg, data)
            get_trainer(get_strategy(by_label[key].name).training).prepare(model)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            feats = forward_pass(model, test, idx, 1024, embeddings=True).embeddings
        files += plot_tsne(
            feats,
            y_true[idx],
            preds,
            out_dir / f"tsne_{key}_round{round_}_run{run}",
            seed=0,
            title=f"{key}, round {round_}",
            class_names=class_names,
        )
    return files
