"""The contract between activelab and the user's objects, checked on the first item / batch so that a mismatch
fails with a message naming the contract instead of deep inside a strategy.

- A pool (or validation) dataset is a torch ``Dataset`` whose items are ``(x, y)`` pairs: ``x`` a tensor (one
  sample), ``y`` an integer label (it may be -1 for unlabeled pools).
- A model maps a batch ``(B, ...)`` to class logits: a 2-D floating-point tensor ``(B, C)``.
"""

from __future__ import annotations

import contextvars
import numbers

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ActivelabError

DATASET_CONTRACT = "a torch Dataset whose items are (x, y) pairs: x a tensor, y an integer label"
MODEL_CONTRACT = "a model returning class logits as a 2-D float tensor (batch, classes)"


#: True while :func:`check_model_and_data` runs its two-sample probe (so counters of model passes can leave it out).
checking: contextvars.ContextVar[bool] = contextvars.ContextVar("activelab_contract_check", default=False)


def check_dataset_item(dataset: Dataset, name: str = "pool") -> tuple[torch.Tensor, int]:
    """The first item of ``dataset``, checked against the dataset contract."""
    try:
        n = len(dataset)
    except TypeError:
        raise ActivelabError(f"the {name} must be {DATASET_CONTRACT}, with a length; it has no len()") from None
    if n == 0:
        raise ActivelabError(f"the {name} is empty")
    item = dataset[0]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        what = f"a {type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
        raise ActivelabError(f"the {name} must be {DATASET_CONTRACT}; its item 0 is {what}")
    x, y = item
    if not isinstance(x, torch.Tensor):
        raise ActivelabError(f"the {name} must be {DATASET_CONTRACT}; x of item 0 is a {type(x).__name__}")
    if isinstance(y, torch.Tensor):
        if y.numel() != 1 or y.is_floating_point():
            raise ActivelabError(f"the {name} must be {DATASET_CONTRACT}; y of item 0 is a tensor {tuple(y.shape)}")
        y = int(y.item())
    elif isinstance(y, bool) or not isinstance(y, numbers.Integral):
        raise ActivelabError(f"the {name} must be {DATASET_CONTRACT}; y of item 0 is {y!r}")
    return x, int(y)


def check_model_output(output: object, batch_size: int, num_classes: int | None = None) -> torch.Tensor:
    """``output`` of a model on a batch of ``batch_size``, checked against the model contract."""
    if not isinstance(output, torch.Tensor):
        raise ActivelabError(f"activelab needs {MODEL_CONTRACT}; the model returned a {type(output).__name__}")
    if output.ndim != 2 or output.shape[0] != batch_size:
        raise ActivelabError(
            f"activelab needs {MODEL_CONTRACT}; on a batch of {batch_size} the model returned shape "
            f"{tuple(output.shape)}"
        )
    if not output.is_floating_point():
        raise ActivelabError(f"activelab needs {MODEL_CONTRACT}; the model returned dtype {output.dtype}")
    if num_classes is not None and output.shape[1] != num_classes:
        raise ActivelabError(
            f"the model returns {output.shape[1]} logits per sample but the data has {num_classes} classes: "
            "build the model's last layer with one output per class"
        )
    return output


def check_model_and_data(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    name: str = "pool",
) -> None:
    """Check the dataset contract on item 0 and the model contract on a batch of two items, in eval mode with
    no gradient; the model's train/eval mode and the global RNG state are left as they were."""
    x0, _ = check_dataset_item(dataset, name)
    second = dataset[1][0] if len(dataset) > 1 else x0
    batch = torch.stack([x0, second]).to(device)
    modes = {m: m.training for m in model.modules()}
    state = torch.random.get_rng_state()
    token = checking.set(True)
    try:
        model.eval()
        with torch.no_grad():
            out = model(batch)
    except ActivelabError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model could not even run: say so with the shapes involved
        raise ActivelabError(
            f"the model failed on a batch of the {name} with shape {tuple(batch.shape)}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        checking.reset(token)
        for m, mode in modes.items():
            m.training = mode
        torch.random.set_rng_state(state)
    check_model_output(out, len(batch), num_classes)
