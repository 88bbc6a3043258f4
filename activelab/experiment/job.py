"""One job: the active learning loop of one strategy in one run, resumable round by round."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..api import resolve_device, run_strategy
from ..config import ExperimentConfig, StrategyConfig
from ..data.arrays import dataset_labels
from ..data.pool_state import PoolState
from ..report.metrics import round_metrics
from ..strategies.base import get_strategy
from ..strategies.random import random_positions
from ..train import get_trainer
from ..train.supervised import evaluate
from .seeding import numpy_rng, torch_generator, torch_seed
from .setup import RunData, atomic_save, ensure_initial_model, new_model, prepare_run
from .store import RoundRecord, Store


def safe_name(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in label)


def checkpoint_path(exp_dir: Path, run: int, label: str, round_: int) -> Path:
    return exp_dir / "models" / f"run{run}" / safe_name(label) / f"round{round_}.pt"


def run_job(exp_dir: str | Path, cfg: ExperimentConfig, run: int, scfg: StrategyConfig, progress: bool = False) -> None:
    """Run (or resume) every remaining round of ``scfg`` in ``run``; each round is committed atomically."""
    exp_dir = Path(exp_dir)
    store = Store(exp_dir / "results.sqlite")
    label = scfg.label
    try:
        store.set_job(run, label, "running")
        _loop(exp_dir, cfg, run, scfg, store, progress)
        store.set_job(run, label, "done")
    except BaseException as exc:
        import traceback

        store.set_job(run, label, "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise
    finally:
        store.close()


def _loop(exp_dir: Path, cfg: ExperimentConfig, run: int, scfg: StrategyConfig, store: Store, progress: bool) -> None:
    label = scfg.label
    seed = cfg.loop.seed
    device = resolve_device(cfg.device)
    data = prepare_run(cfg, run)
    store.put_run(run, data.pool_indices, data.validation_indices, data.class_counts, data.minority)
    strategy = get_strategy(scfg.name)(**scfg.params)
    trainer = get_trainer(strategy.training)
    init_state = ensure_initial_model(cfg, exp_dir, data, scfg.init or cfg.init, device, progress)
    pool_labels = dataset_labels(data.pool)
    test_labels = dataset_labels(data.test)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed, run, label, "trainer-modules"))
        model = new_model(cfg, data)
        trainer.prepare(model)
    model.load_state_dict(init_state, strict=False)
    init_full = {k: v.clone() for k, v in model.state_dict().items()}  # includes what prepare() attached
    model.to(device)

    done = store.last_round(run, label)
    state = PoolState(len(data.pool))
    if done is None:
        start = 0
    else:
        selections = {r.round: r.selected for r in store.rounds(run, label)}
        state = PoolState.from_selections(len(data.pool), selections)
        model.load_state_dict(torch.load(checkpoint_path(exp_dir, run, label, done), map_location=device))
        start = done + 1

    for round_ in range(start, cfg.loop.rounds + 1):
        info: dict = {}
        t0 = time.perf_counter()
        if round_ == 0:
            if cfg.loop.initial == 0:
                continue  # nothing to train on: the first round selects with the initial model
            selected = data.initial
        elif len(state.labeled) == 0 and strategy.first_round_random:
            rng = numpy_rng(seed, run, label, round_, "select")
            selected = state.unlabeled[random_positions(len(state.unlabeled), cfg.loop.budget, rng)]
            info["first_round"] = "random"
        else:
            rng = numpy_rng(seed, run, label, round_, "select")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch_seed(seed, run, label, round_, "select-torch"))
                selected = run_strategy(
                    strategy,
                    model,
                    data.pool,
                    state.labeled,
                    cfg.loop.budget,
                    rng,
                    data.validation,
                    batch_size=cfg.loop.query_batch_size,
                    info=info,
                )
        select_seconds = time.perf_counter() - t0
        state.label(selected, round_)

        if cfg.train.restart == "reinit":
            model.load_state_dict(init_full)
        validation = (data.validation, np.arange(len(data.validation))) if cfg.train.select_by == "validation" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed(seed, run, label, round_, "train-torch"))
            result = trainer.fit(
                model,
                data.pool,
                state.labeled,
                cfg.train,
                generator=torch_generator(seed, run, label, round_, "train"),
                validation=validation,
                device=device,
                progress=progress,
            )
        t1 = time.perf_counter()
        predictions = evaluate(model, data.test, np.arange(len(data.test)), cfg.train.eval_batch_size, device)
        eval_seconds = time.perf_counter() - t1
        metrics = round_metrics(test_labels, predictions, data.num_classes, data.minority)
        labeled_counts = np.bincount(pool_labels[state.labeled], minlength=data.num_classes)
        atomic_save(
            {k: v.detach().cpu() for k, v in model.state_dict().items()},
            checkpoint_path(exp_dir, run, label, round_),
        )
        store.put_round(
            RoundRecord(
                run=run,
                strategy=label,
                round=round_,
                n_labeled=len(state.labeled),
                accuracy=metrics["accuracy"],
                balanced_accuracy=metrics["balanced_accuracy"],
                minority_recall=metrics["minority_recall"],
                per_class_recall=metrics["per_class_recall"],
                labeled_per_class=labeled_counts.tolist(),
                select_seconds=select_seconds,
                train_seconds=result.seconds,
                eval_seconds=eval_seconds + result.eval_seconds,
                epochs=result.epochs,
                val_accuracy=result.val_accuracy,
                selected=selected,
                test_predictions=predictions,
                info=info,
            )
        )
        if cfg.loop.keep_checkpoints == "last" and round_ > 0:
            checkpoint_path(exp_dir, run, label, round_ - 1).unlink(missing_ok=True)


def run_data_for(cfg: ExperimentConfig, run: int) -> RunData:
    return prepare_run(cfg, run)
