"""``activelab pretrain``: make every run's initial models ahead of ``activelab run`` (the authors' --initial)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ..config import load_config
from ..inference.device import resolve_device
from .layout import Layout
from .runner import experiment_lock, parse_runs, prepare_directory
from .setup import ensure_initial_model, prepare_run


def pretrain_initial_models(
    config_path: str | Path, out: str | Path | None = None, runs: str | None = None
) -> list[Path]:
    from .validate import preflight

    config_path = Path(config_path)
    cfg = load_config(config_path)
    layout = Layout(out if out is not None else Path("runs") / cfg.name)
    selected = parse_runs(runs, cfg.loop.runs)
    preflight(cfg)
    inits = sorted({cfg.init, "random", *(s.init for s in cfg.strategies if s.init)})
    device = resolve_device(cfg.device)
    paths = []
    with experiment_lock(layout):
        cfg = prepare_directory(cfg, config_path.read_text(), layout)
        for run in tqdm(selected, desc="runs", unit="run"):
            data = prepare_run(cfg, run)
            for init in inits:
                ensure_initial_model(cfg, layout.root, data, init, device, progress=True)
                paths.append(layout.initial_model(run, init))
    return paths
