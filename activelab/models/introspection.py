"""Model introspection: reaching layers by name (taps, the classifier), eval mode with optional dropout, the
model's device, pooling of tapped activations, and Embedding renormalisation ahead of functorch transforms.
Used by training, inference and the query context alike."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ActivelabError


def named_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        names = [n for n in modules if n]
        raise ActivelabError(
            f"the model has no module named {name!r}; its modules are: {', '.join(names[:60])}"
            + (" ..." if len(names) > 60 else "")
        )
    return modules[name]


def classifier_name(model: nn.Module, classifier: str | None = None) -> str:
    """The final linear layer: ``classifier`` if given, the model's ``classifier_name``, else the last Linear."""
    if classifier is not None:
        named_module(model, classifier)
        return classifier
    declared = getattr(model, "classifier_name", None)
    if declared:
        return declared
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ActivelabError("the model has no nn.Linear layer; pass classifier='<module name>'")
    return linears[-1]


def tap_names(model: nn.Module, taps: Sequence[str] | None = None, strategy: str = "this strategy") -> list[str]:
    """The tapped layers: ``taps`` if given, else the model's ``default_taps``; an error names the options."""
    if taps is None:
        taps = getattr(model, "default_taps", None)
    if not taps:
        names = [n for n, _ in model.named_modules() if n]
        raise ActivelabError(
            f"{strategy} reads intermediate activations: pass taps=[...] with module names of your model, "
            f"e.g. some of: {', '.join(names[:30])}"
        )
    for name in taps:
        named_module(model, name)
    return list(taps)


class TapCapture:
    """Forward hooks that keep the tapped activations of the current batch (in tap order)."""

    def __init__(self, model: nn.Module, taps: Sequence[str]) -> None:
        self.names = list(taps)
        self.acts: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in self.names:
            module = named_module(model, name)
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise ActivelabError(f"tap {name!r} returns {type(output).__name__}, not a tensor; tap another layer")
            if name in self.acts:
                raise ActivelabError(f"tap {name!r} is called twice in one forward pass; tap a layer used once")
            self.acts[name] = output

        return hook

    def take(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self.acts]
        if missing:
            raise ActivelabError(f"taps {missing} were not run by the model's forward pass; choose other taps")
        acts = [self.acts[n] for n in self.names]
        self.acts = {}
        return acts

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> TapCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def renormed_embeddings(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """For the body of the block, Embedding layers with ``max_norm`` run without renormalising, after one plain
    forward pass of ``x`` (no grad) has renormalised the rows ``x`` reads, as any forward pass does (the weights
    change in place: PyTorch's behaviour). ``vmap`` cannot run that in-place renormalisation; a renormalised row
    is left as it is by the next one, so the block's passes of ``x`` see what a forward pass with it would. Models
    without such layers: nothing is run. Not for a model other threads run meanwhile (``max_norm`` is unset on
    the module itself)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.max_norm is not None]
    if not layers:
        yield
        return
    with torch.no_grad():
        model(x)
    norms = [m.max_norm for m in layers]
    for m in layers:
        m.max_norm = None
    try:
        yield
    finally:
        for m, max_norm in zip(layers, norms, strict=True):
            m.max_norm = max_norm


class eval_mode:
    """Context manager: the model in eval mode (optionally with dropout left on), restored afterwards."""

    def __init__(self, model: nn.Module, dropout: bool = False) -> None:
        self.model, self.dropout = model, dropout

    def __enter__(self) -> nn.Module:
        self.was_training = {m: m.training for m in self.model.modules()}
        self.model.eval()
        if self.dropout:
            for m in self.model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.train()
        return self.model

    def __exit__(self, *exc) -> None:
        for m, mode in self.was_training.items():
            m.training = mode


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def pool_activation(act: torch.Tensor) -> torch.Tensor:
    """Global average over every dimension after the channel dimension: (B, C, ...) -> (B, C)."""
    if act.ndim < 2:
        raise ActivelabError(f"a tapped activation must have a batch and a channel dimension; got {act.shape}")
    return act if act.ndim == 2 else act.flatten(2).mean(dim=2)


#: Attribute listing a model's training-only heads (e.g. a loss-prediction module): their parameters are not
#: part of the model's backbone theta for per-sample gradients.
AUXILIARY_ATTR = "auxiliary_modules"


def mark_auxiliary(model: nn.Module, name: str) -> None:
    """Declare the submodule ``name`` a training-only head of ``model`` (see :func:`auxiliary_prefixes`)."""
    names = tuple(getattr(model, AUXILIARY_ATTR, ()))
    if name not in names:
        object.__setattr__(model, AUXILIARY_ATTR, (*names, name))


def auxiliary_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the heads declared with :func:`mark_auxiliary`."""
    return tuple(f"{name}." for name in getattr(model, AUXILIARY_ATTR, ()))
