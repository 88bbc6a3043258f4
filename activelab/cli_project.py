"""``activelab project init|query|status|export|import`` and ``activelab serve``: labeling your own data."""

from __future__ import annotations

import json
import sys

import click

from .cli import main


def _open(folder: str):
    from .project.core import Project

    return Project(folder)


@main.group()
def project() -> None:
    """Label your own images: a project folder with a database, training between rounds and a labeling page."""


@project.command("init")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--images", type=click.Path(exists=True, file_okay=False), help="folder of images (flat or per class)")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), help="CSV of path,label (class names)")
@click.option("--arrays", type=click.Path(exists=True, dir_okay=False), help=".npy images or .npz (x, y, classes)")
@click.option("--classes", help="comma-separated class names, in key order (default: from the data)")
@click.option("--size", type=click.IntRange(min=2), default=64, show_default=True, help="image side in pixels")
@click.option("--mode", type=click.Choice(["RGB", "L"]), default="RGB", show_default=True, help="L = grayscale")
@click.option("--fit", type=click.Choice(["pad", "crop", "stretch"]), default="pad", show_default=True)
@click.option("--model", default="lenet", show_default=True, help="built-in model name, or module:factory")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="training epochs per round (default 15)")
@click.option("--validation-share", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True)
def init(folder, images, labels, arrays, classes, size, mode, fit, model, epochs, validation_share) -> None:
    """Create a project in FOLDER and index the data (each image read and decoded once)."""
    from .project.core import Project

    p = Project.init(
        folder,
        images=images,
        labels=labels,
        arrays=arrays,
        classes=[c.strip() for c in classes.split(",")] if classes else None,
        size=size,
        mode=mode,
        fit=fit,
        model=model,
        train={"epochs": epochs} if epochs else None,
        validation_share=validation_share,
    )
    click.echo(p.report())


@project.command("query")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--strategy", default="margin", show_default=True, help="a name from activelab.available_strategies()")
@click.option("--budget", type=click.IntRange(min=1), default=20, show_default=True, help="images to pick")
@click.option("--train/--no-train", default=False, help="train on the labels so far first")
@click.option("--validation-per-class", type=click.IntRange(min=1), default=None, help="label-k-per-class round")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="a strategy parameter (JSON value)")
@click.option("--seed", type=int, default=None)
@click.option("--device", default="cpu", show_default=True)
def query(folder, strategy, budget, train, validation_per_class, params, seed, device) -> None:
    """Pick the next batch to label (recorded as a round; the page shows it)."""
    p = _open(folder)
    if train:
        record = p.fit()
        acc = record["val_accuracy"]
        click.echo(
            f"trained on {record['train_size']}; held-out accuracy "
            f"{'n/a' if acc is None else f'{acc:.1%}'} on {record['val_size']}"
        )
    kwargs = {}
    for item in params:
        key, _, value = item.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    batch = p.query(budget, strategy, seed=seed, validation_per_class=validation_per_class, device=device, **kwargs)
    round_ = p.store.rounds()[-1]
    click.echo(f"round {round_['round']} ({round_['strategy']}): {len(batch)} images")
    if round_["info"].get("fallback"):
        click.echo(f"note: fell back to {round_['info']['fallback']} picks: {round_['info'].get('fallback_reason')}")
    for item in batch:
        score = "" if item["score"] is None else f"{item['score']:.4f}"
        guess = item["guesses"][0][0] if item["guesses"] else ""
        click.echo(f"{item['id']}  {score:>8}  {guess:<12} {item['path']}")


@project.command("status")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="machine-readable")
def status(folder, as_json) -> None:
    """Labels per class, rounds, and the last accuracy on the held-out labeled share."""
    p = _open(folder)
    click.echo(json.dumps(p.status(), indent=2, default=str) if as_json else p.report())


@project.command("export")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="file (.csv, .json) or folder (imagefolder)")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "imagefolder"]), default=None)
@click.option("--link", is_flag=True, help="imagefolder: hard-link files instead of copying")
def export(folder, out, fmt, link) -> None:
    """Write the labels as CSV (path,label), JSON (with history) or a torchvision ImageFolder tree."""
    click.echo(str(_open(folder).export(out, fmt, link=link)))


@project.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("source", type=click.Path(exists=True))
@click.option("--overwrite", is_flag=True, help="let imported labels win conflicts (the history keeps both)")
def import_(folder, source, overwrite) -> None:
    """Merge labels from a CSV, a JSON export or an ImageFolder tree; conflicts are reported, not overwritten."""
    report = _open(folder).import_labels(source, overwrite=overwrite)
    click.echo(
        f"added {report['added']}, unchanged {report['unchanged']}, conflicts {len(report['conflicts'])}, "
        f"not in the project {len(report['unknown'])}"
    )
    for c in report["conflicts"]:
        click.echo(f"conflict: {c['path']}: ours {c['ours']!r}, theirs {c['theirs']!r}")


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (beyond loopback: token)")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--token", default=None, help="access token (made and printed when listening beyond loopback)")
def serve(folder, host, port, token) -> None:
    """Serve the labeling page of the project in FOLDER (http://127.0.0.1:8765 by default)."""
    from .web.server import serve as run_server

    run_server(folder, host=host, port=port, token=token)


def _also_register_on_main_module() -> None:
    """Under ``python -m activelab.cli`` the group that runs is ``__main__.main``, not ``activelab.cli.main``."""
    runner = sys.modules.get("__main__")
    group = getattr(runner, "main", None)
    if getattr(getattr(runner, "__spec__", None), "name", "") == "activelab.cli" and group is not main:
        group.add_command(project)
        group.add_command(serve)


_also_register_on_main_module()
