"""One job: the active learning loop of one strategy in one run, resumable round by round."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..api import resolve_device
from ..config import ExperimentConfig, StrategyConfig
from ..data.arrays import dataset_labels
from ..data.pool_state import PoolState
from ..metrics import round_metrics
from ..query.engine import RoundSeed, run_query
from ..strategies.wrappers import build_strategy
from ..train import get_trainer
from ..train.supervised import evaluate, prior_offset
from .layout import Layout, safe_name
from .seeding import numpy_rng, torch_generator, torch_seed
from .setup import RunData, atomic_save, ensure_initial_model, new_model, prepare_run
from .stopset import stop_reason, stop_set_entry, stop_set_indices
from .store import RoundRecord, Store

__all__ = ["checkpoint_path", "run_job", "safe_name"]


def checkpoint_path(exp_dir: Path, run: int, label: str, round_: int, member: int = 0) -> Path:
    """The saved model of a round (see :class:`~activelab.experiment.layout.Layout`)."""
    return Layout(exp_dir).checkpoint(run, label, round_, member)


def _member_model(cfg, data, trainer, init_state, seed, run, label, j, device):
    """Model ``j`` of a strategy's ensemble (``j`` = 0: the model itself). Every member starts from the run's
    initial weights; members beyond the first get their own freshly drawn classifier head, and their own
    training seeds, so they differ as separately trained models do."""
    from ..models import replace_classifier

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed, run, "trainer-modules", trainer.name, *(("member", j) if j else ())))
        model = new_model(cfg, data)
        trainer.prepare(model)
        model.load_state_dict(init_state, strict=False)
        if j:
            replace_classifier(model, data.num_classes)
    return model.to(device)


def run_job(exp_dir: str | Path, cfg: ExperimentConfig, run: int, scfg: StrategyConfig, progress: bool = False) -> None:
    """Run (or resume) every remaining round of ``scfg`` in ``run``; each round is committed atomically."""
    exp_dir = Path(exp_dir)
    store = Store(Layout(exp_dir).store)
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
    strategy = build_strategy(scfg.name, scfg.params, [w.model_dump() for w in scfg.wrap])
    trainer = get_trainer(strategy.training)
    init_state = ensure_initial_model(cfg, exp_dir, data, scfg.init or cfg.init, device, progress)
    pool_labels = dataset_labels(data.pool)
    test_labels = dataset_labels(data.test)

    members = [
        _member_model(cfg, data, trainer, init_state, seed, run, label, j, device)
        for j in range(strategy.ensemble_size())
    ]
    model = members[0]
    init_states = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]

    done = store.last_round(run, label)
    state = PoolState(len(data.pool))
    stop_idx = stop_set_indices(cfg, data)
    past = store.rounds(run, label) if done is not None else []
    infos, labeled_history = [r.info for r in past], [r.n_labeled for r in past]
    if any("stopped_by" in info for info in infos):
        return  # a stopping criterion ended this run
    first_round = build_strategy(scfg.first_round.name, scfg.first_round.params) if scfg.first_round else None
    if done is None:
        start = 0
    else:
        selections = {r.round: r.selected for r in past}
        state = PoolState.from_selections(len(data.pool), selections)
        for j, member in enumerate(members):
            member.load_state_dict(
                torch.load(checkpoint_path(exp_dir, run, label, done, j), map_location=device, weights_only=True)
            )
        start = done + 1

    for round_ in range(start, cfg.loop.rounds + 1):
        info: dict = {}
        t0 = time.perf_counter()
        if round_ == 0:
            if cfg.loop.initial == 0:
                continue  # nothing to train on: the first round selects with the initial model
            selected = data.initial
        elif first_round is not None and round_ == 1:
            budget = scfg.first_round.budget or cfg.loop.budget
            selected, info = select_round(first_round, model, [model], data, state, cfg, run, label, round_, budget)
            info["first_round"] = scfg.first_round.label
        else:
            selected, info = select_round(strategy, model, members, data, state, cfg, run, label, round_)
        select_seconds = time.perf_counter() - t0
        state.label(selected, round_)

        validation = (data.validation, np.arange(len(data.validation))) if cfg.train.select_by == "validation" else None
        results = []
        for j, member in enumerate(members):
            if cfg.train.restart == "reinit":
                member.load_state_dict(init_states[j])
            # Round 0 trains on the shared initial set with seeds that leave out the strategy, so every strategy
            # (with the same trainer) starts the first acquisition from the same model.
            owner = "round0" if round_ == 0 else label
            keys = (run, owner, round_) if j == 0 else (run, owner, round_, "member", j)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch_seed(seed, *keys, "train-torch"))
                results.append(
                    trainer.fit(
                        member,
                        data.pool,
                        state.labeled,
                        cfg.train,
                        generator=torch_generator(seed, *keys, "train"),
                        validation=validation,
                        device=device,
                        progress=progress,
                    )
                )
        result = results[0]
        t1 = time.perf_counter()
        offset = prior_offset(pool_labels[state.labeled], data.num_classes) if cfg.train.prior_correction else None
        predictions = evaluate(
            model, data.test, np.arange(len(data.test)), cfg.train.eval_batch_size, device, logit_offset=offset
        )
        eval_seconds = time.perf_counter() - t1
        labeled_counts = np.bincount(pool_labels[state.labeled], minlength=data.num_classes)
        metrics = round_metrics(test_labels, predictions, data.num_classes, data.minority, labeled_counts)
        selected_counts = np.bincount(pool_labels[np.asarray(selected, dtype=np.int64)], minlength=data.num_classes)
        if len(stop_idx):
            previous = next((i["stop_set"]["predictions"] for i in reversed(infos) if "stop_set" in i), None)
            info["stop_set"] = stop_set_entry(model, data, stop_idx, previous, cfg.loop.query_batch_size)
        infos.append(info)
        labeled_history.append(len(state.labeled))
        reason = stop_reason(cfg.loop.stop_when, infos, labeled_history)
        if reason:
            info["stopped_by"] = reason
        for j, member in enumerate(members):
            atomic_save(
                {k: v.detach().cpu() for k, v in member.state_dict().items()},
                checkpoint_path(exp_dir, run, label, round_, j),
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
                train_seconds=sum(r.seconds for r in results),
                eval_seconds=eval_seconds + sum(r.eval_seconds for r in results),
                epochs=result.epochs,
                val_accuracy=result.val_accuracy,
                selected=selected,
                test_predictions=predictions,
                info=info,
                selected_per_class=selected_counts.tolist(),
                macro_f1=metrics["macro_f1"],
                worst_class_recall=metrics["worst_class_recall"],
                classes_labeled=metrics["classes_labeled"],
                minority_label_share=metrics["minority_label_share"],
            )
        )
        if cfg.loop.keep_checkpoints == "last" and round_ > 0:
            for j in range(len(members)):
                checkpoint_path(exp_dir, run, label, round_ - 1, j).unlink(missing_ok=True)
        if reason:
            break


def round_seed(seed: int, run: int, label: str, round_: int) -> RoundSeed:
    """The randomness of one round's selection: the same in every process, on every resume."""
    return RoundSeed(
        numpy_rng(seed, run, label, round_, "select"), torch_seed(seed, run, label, round_, "select-torch")
    )


def select_round(
    strategy, model, members, data: RunData, state: PoolState, cfg, run: int, label: str, round_: int, budget=None
):
    """One round's picks through the engine shared with ``activelab.select``; the pool's labels answer the
    in-round oracle, only for the samples asked. ``budget``: default ``loop.budget``."""
    pool_labels = dataset_labels(data.pool)
    result = run_query(
        strategy,
        model,
        data.pool,
        state.labeled,
        budget or cfg.loop.budget,
        round_seed(cfg.loop.seed, run, label, round_),
        validation=data.validation,
        batch_size=cfg.loop.query_batch_size,
        ensemble_models=members if len(members) > 1 else None,
        oracle=lambda idx: pool_labels[idx],
    )
    return result.indices, result.info
