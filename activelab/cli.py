"""The ``activelab`` command line."""

from __future__ import annotations

import json
import sys
import warnings

import click

from .errors import ActivelabError, ActivelabWarning


class _Group(click.Group):
    """Print user errors (bad config, missing data, a bad option, ...) as one ``error:`` message without a
    traceback, exit status 2; a failed run exits with 1."""

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ActivelabWarning)
                try:
                    return super().invoke(ctx)
                finally:
                    for w in caught:
                        if issubclass(w.category, ActivelabWarning):
                            click.echo(f"warning: {w.message}", err=True)
                        else:
                            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        except ActivelabError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    def main(self, *args, **kwargs):
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="activelab")
def main() -> None:
    """activelab: deep active learning experiments and selection on PyTorch."""


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="experiment directory (default runs/<config name>)")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="parallel local processes")
@click.option("--runs", "runs", metavar="A:B", help="only runs A..B-1 (0-based), e.g. 0:3")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option(
    "--address",
    "--ray-address",
    "ray_address",
    default=None,
    help="with --executor ray: an existing cluster (HOST:PORT, ray://HOST:10001 or auto); default: start a local one",
)
@click.option(
    "--cpus-per-job",
    type=click.IntRange(min=1),
    default=None,
    help="with --executor ray: CPUs each job reserves = its torch threads (default: the config's threads, else 1)",
)
@click.option("--quiet", is_flag=True, help="no progress bar")
def run(config, out, workers, runs, executor, ray_address, cpus_per_job, quiet) -> None:
    """Run the experiment of CONFIG (a YAML file); resume it if its directory exists.

    With --executor ray, each (run, strategy) job is a Ray task; the cluster runs as many at once as its CPUs
    allow (--cpus-per-job each), so --workers does not apply and is refused. The experiment directory (--out)
    must be on a filesystem every node sees at the same path.
    """
    from .errors import ActivelabError
    from .experiment.executors import RayExecutor
    from .experiment.runner import run_experiment

    if executor != "ray" and (ray_address is not None or cpus_per_job is not None):
        raise ActivelabError("--address and --cpus-per-job are options of --executor ray")
    if executor == "ray" and workers != 1:
        raise ActivelabError(
            "--workers is for the local executor; with --executor ray the cluster runs as many jobs at once as "
            "its CPUs allow: set --cpus-per-job (CPUs and torch threads per job) instead"
        )
    ex = RayExecutor(ray_address, cpus_per_job) if executor == "ray" else None
    outcome = run_experiment(config, out, workers=workers, runs=runs, executor=ex, progress=not quiet)
    click.echo(
        f"{outcome.exp_dir}: {len(outcome.done)} job(s) finished, {len(outcome.skipped)} already complete, "
        f"{len(outcome.failed)} failed"
    )
    for (run_, key), err in sorted(outcome.failed.items()):
        click.echo(f"FAILED run {run_} {key}:\n{err}", err=True)
    if outcome.failed:
        sys.exit(1)


@main.command()
@click.argument("exp_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the machine-readable report")
@click.option(
    "--target",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="target accuracy (0-1) for labels-to-target",
)
def report(exp_dir, as_json, target) -> None:
    """Print the summary table of an experiment directory."""
    from .experiment.runner import load_experiment
    from .report.stopping import stopping_summary, stopping_text
    from .report.summary import report_json, report_text, summarize

    cfg, store = load_experiment(exp_dir)
    summaries = summarize(cfg, store, target)
    stopping = stopping_summary(cfg, store)
    store.close()
    if as_json:
        out = report_json(cfg, summaries, target)
        if stopping:
            out["stopping"] = stopping
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(report_text(cfg, summaries, target))
        if stopping:
            click.echo("\n" + stopping_text(cfg, stopping))


@main.command()
@click.argument("exp_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="figure folder (default EXP_DIR/figures)")
@click.option("--strategies", help="comma-separated strategy keys (default: all)")
@click.option(
    "--target",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="annotate labels saved at this accuracy (0-1)",
)
@click.option("--highlight", default=None, help="the strategy whose label savings are annotated")
@click.option("--versus", default=None, help="comma-separated strategies --highlight is compared with (default: all)")
@click.option("--reference", type=float, default=None, help="whole-pool accuracy line (0-1)")
@click.option("--confusion", "confusion_round", type=int, default=None, help="confusion matrices at ROUND")
@click.option("--tsne", "tsne_round", type=int, default=None, help="t-SNE of the test set at ROUND")
@click.option("--run", "run_", type=int, default=0, show_default=True, help="run for --confusion/--tsne")
@click.option("--tsne-space", type=click.Choice(["features", "pixels"]), default="features", show_default=True)
@click.option("--tsne-samples", type=int, default=2000, show_default=True, help="test samples in the t-SNE")
def plot(
    exp_dir,
    out,
    strategies,
    target,
    highlight,
    versus,
    reference,
    confusion_round,
    tsne_round,
    run_,
    tsne_space,
    tsne_samples,
) -> None:
    """Draw the learning curves (and optionally confusion matrices / t-SNE) of an experiment directory."""
    from .report.figures import draw_figures

    files = draw_figures(
        exp_dir,
        out=out,
        strategies=strategies.split(",") if strategies else None,
        target=target,
        highlight=highlight,
        versus=versus.split(",") if versus else None,
        reference=reference,
        confusion_round=confusion_round,
        tsne_round=tsne_round,
        run=run_,
        tsne_space=tsne_space,
        tsne_samples=tsne_samples,
    )
    for f in files:
        click.echo(str(f))


@main.command()
@click.option("--check", is_flag=True, help="also load both splits of every available dataset and report their sizes")
def datasets(check: bool) -> None:
    """List the datasets and whether each is available on this machine (its files are found).

    With --check, each available dataset is loaded (its files parsed; nothing is downloaded, so no checksum
    is verified) and a dataset whose files are found but cannot be read is reported as broken, with the error;
    the command then exits with status 1.
    """
    from .data.sources import dataset_status, load_split

    broken = 0
    for row in dataset_status():
        mark = "yes" if row["available"] else "no "
        where = row.get("location") or row.get("note") or ""
        if check and row["available"]:
            try:
                sizes = [len(load_split(row["name"], split, download=False)) for split in ("train", "test")]
                where += f"  (train {sizes[0]:,} / test {sizes[1]:,})"
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status says so
                mark, broken = "BROKEN", broken + 1
                where += f"  ({type(exc).__name__}: {exc})"
        click.echo(f"{row['name']:<14} {mark}  {where}")
    if broken:
        raise SystemExit(1)


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="experiment directory (default runs/<config name>)")
@click.option("--runs", "runs", metavar="A:B", help="only runs A..B-1 (0-based)")
def pretrain(config, out, runs) -> None:
    """Make the initial models (random and rotation-pretrained) of every run ahead of `activelab run`."""
    from .experiment.pretrain import pretrain_initial_models

    for path in pretrain_initial_models(config, out, runs):
        click.echo(str(path))


from . import cli_project  # noqa: E402,F401  (registers `project` and `serve`)

if __name__ == "__main__":
    main()
