"""Plugins: a strategy, a model factory or a dataset source of the user's own, named in configs and calls as
``"package.module:attribute"``. The module is imported where the name is used, so plugins work in every
executor (sequential, worker processes, Ray tasks) as long as the module is importable there."""

from __future__ import annotations

import importlib

from .errors import ActivelabError


def is_plugin(name: str) -> bool:
    return ":" in name


def load_plugin(spec: str, what: str) -> object:
    """The object named by ``"package.module:attribute"`` (a strategy, model factory or dataset source of the
    user's own), imported on use; a clear error if it cannot be found."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ActivelabError(f"{what} {spec!r}: a plugin is named as 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ActivelabError(f"{what} {spec!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ActivelabError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
