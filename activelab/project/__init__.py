"""Label your own data: projects over a user's images, with a database, training between rounds and a
notebook object (:class:`Project`). See :mod:`activelab.project.core`."""

from __future__ import annotations

from typing import Any

__all__ = ["Project", "open_project"]


def __getattr__(name: str) -> Any:  # imported on first use: activelab.data.sources imports our sources lazily
    if name in __all__:
        from . import core

        return getattr(core, name)
    raise AttributeError(name)
