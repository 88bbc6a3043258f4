"""``activelab pretrain``: make every run's initial models ahead of ``activelab run`` (the authors' --initial)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ..api import resolve_device
from ..config import load_config
from .runner import parse_runs, prepare_directory
from .setup import ensure_initial_model, initial_model_path, prepare_run


def pretrain_initial_models(
    config_path: str | Path, out: str | Path | None = None, runs: str | None = None
) -> list[Path]:
    config_path = Path(config_path)
    cfg = load_config(config_path)
    exp_dir = Path(out) if out is not None else Path("runs") / cfg.name
    prepare_directory(cfg, config_path.read_text(), exp_dir)
    inits = sorted({cfg.init, "random", *(s.init for s in cfg.strategies if s.init)})
    device = resolve_device(cfg.device)
    paths = []
    for run in tqdm(parse_runs(runs, cfg.loop.runs), desc="runs", unit="run"):
        data = prepare_run(cfg, run)
        for init in inits:
            ensure_initial_model(cfg, exp_dir, data, init, device, progress=True)
            paths.append(initial_model_path(exp_dir, run, init))
    return paths
