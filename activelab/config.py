"""The experiment configuration: one YAML file, validated with pydantic.

Every section rejects unknown keys, a key written twice in one mapping is an error naming both lines, and every
error names the valid keys or values, so a typo never runs a different experiment than the one written down.

This module knows the schema only: strategy names and parameters are checked by the experiment layer
(:func:`activelab.experiment.validate.check_strategies`) before the first job, so a strategy of the user's own
(``module:attr``) is resolved where it runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .stopping import StopWhen


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Section):
    name: str = Field(description="a name from `activelab datasets`")
    root: str | None = Field(None, description="folder holding the files (default: search the usual places)")
    download: bool = Field(True, description="download when the files are nowhere on disk")
    classes: list[int] | None = Field(None, description="keep only these classes (relabelled 0..k-1)")
    clip_to: int | None = Field(
        None, ge=2, description="keep classes 0..K-2 and merge all others into class K-1 (GALAXY's protocol)"
    )


class BiasConfig(_Section):
    """How the biased training pool is drawn from the training split (after the validation split is carved)."""

    kind: Literal["none", "step", "random_classes", "long_tail", "counts"] = "none"
    ratio: float = Field(1.0, ge=1.0, description="imbalance ratio r (step, random_classes, long_tail)")
    minority: list[int] | None = Field(None, description="step: the minority classes (default: upper half)")
    counts: dict[int, int] | None = Field(None, description="counts: images per class")
    pool_size: int | None = Field(None, ge=1, description="none: subsample the pool to this many images")
    label_noise: float = Field(
        0.0, ge=0, lt=1, description="symmetric noise: this fraction of pool labels flipped to a random other class"
    )

    @model_validator(mode="after")
    def _check(self) -> BiasConfig:
        if self.kind == "counts" and not self.counts:
            raise ValueError("bias kind 'counts' needs counts: {class: number, ...}")
        if self.kind != "counts" and self.counts:
            raise ValueError(f"counts is only read by bias kind 'counts', not {self.kind!r}")
        return self


class ValidationConfig(_Section):
    per_class: int = Field(0, ge=0, description="class-balanced validation images carved from train per class")


class ModelConfig(_Section):
    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        builtin = ("digits_cnn", "lenet", "resnet10", "resnet18")
        if v not in builtin and ":" not in v:
            raise ValueError(
                f"unknown model {v!r}; use one of {', '.join(map(repr, builtin))} or 'package.module:factory'"
            )
        return v

    name: str = Field(description="digits_cnn, lenet, resnet10, resnet18, or 'package.module:factory'")
    stem: Literal["cifar", "imagenet"] = "cifar"
    dropout: bool = Field(True, description="build the MC-dropout layers (off in eval unless MC sampling)")


class TrainConfig(_Section):
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(25, ge=1)
    epochs: int = Field(50, ge=1, description="epochs per round (the cap when until_train_accuracy is set)")
    milestones: list[int] = Field(default_factory=list, description="epochs at which lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: int = Field(0, ge=0, description="linear learning-rate warm-up")
    until_train_accuracy: float | None = Field(None, gt=0, le=1, description="stop once training accuracy >= this")
    augment: Literal["none", "crop", "crop_flip"] = "none"
    restart: Literal["warm", "reinit"] = Field("warm", description="warm-start from last round, or re-initialise")
    select_by: Literal["validation", "last"] = Field("last", description="best validation epoch, or last epoch")
    eval_batch_size: int = Field(1024, ge=1)
    # loss-prediction joint training (LPLgrad / LL4AL)
    loss_weight: float = Field(1.0, ge=0, description="lambda of the loss-prediction loss")
    loss_margin: float = Field(1.0, ge=0, description="xi of the ranking loss")
    detach_epoch: int | None = Field(None, ge=0, description="detach the tapped features after this epoch")
    # training for imbalance (applied equally to every strategy; off by default)
    class_weights: Literal["none", "inverse_frequency"] = Field(
        "none", description="weight the cross-entropy by inverse labeled class counts"
    )
    prior_correction: bool = Field(
        False, description="at test time, subtract the log of the labeled class frequencies from the logits"
    )

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if v != sorted(v):
            raise ValueError("milestones must be increasing")
        return v


class PretrainConfig(_Section):
    """Rotation self-supervised pretraining of the initial model (FK's theta^0)."""

    epochs: int = Field(8, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(25, ge=1, description="images per batch (x4 rotated copies)")
    milestones: list[int] = Field(default_factory=lambda: [3, 6])
    gamma: float = Field(0.1, gt=0)


class LoopConfig(_Section):
    initial: int = Field(0, ge=0, description="random labeled samples before the first round")
    budget: int = Field(ge=1, description="labels acquired per round")
    rounds: int = Field(ge=1, description="acquisition rounds")
    runs: int = Field(1, ge=1, description="independent runs (pool, split, initial set and weights re-drawn)")
    seed: int = Field(0, ge=0, description="the experiment's seed (every random stream derives from it)")
    target_accuracy: float | None = Field(None, gt=0, le=1, description="for labels_to_target in reports")
    query_batch_size: int = Field(512, ge=1, description="batch size of the strategies' model passes")
    keep_checkpoints: Literal["all", "last"] = Field(
        "all", description="keep every round's model (for confusion matrices / t-SNE) or only the last"
    )
    stop_set: int = Field(
        0,
        ge=0,
        description="size of a fixed seeded unlabeled sample of the pool on which each round's model is "
        "evaluated for the stopping criteria (0: none)",
    )
    stop_when: StopWhen | None = Field(None, description="end a run at the first round where a criterion fires")

    @model_validator(mode="after")
    def _check_stop(self) -> LoopConfig:
        rule = self.stop_when
        if rule and (rule.stabilizing_kappa or rule.uncertainty_below is not None) and self.stop_set == 0:
            raise ValueError("loop.stop_when on kappa or uncertainty needs loop.stop_set > 0 (e.g. 1000)")
        return self


def _with_params(name: str, params: dict[str, Any]) -> str:
    if not params:
        return name
    inner = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{name}[{inner}]"


class WrapperConfig(_Section):
    name: Literal["subsample", "class_balanced", "stochastic"]
    params: dict[str, Any] = Field(default_factory=dict)


class FirstRoundConfig(_Section):
    """Another strategy for the first acquisition (round 1), e.g. a label-free cold start before margin."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    budget: int | None = Field(None, ge=1, description="labels of the first acquisition (default: loop.budget)")

    @property
    def label(self) -> str:
        return _with_params(self.name, self.params) + (f"@{self.budget}" if self.budget else "")


class StrategyConfig(_Section):
    name: str = Field(description="a registered strategy, or 'package.module:Class' for one of your own")
    key: str | None = Field(None, description="the name shown in reports (default: name and parameters)")
    params: dict[str, Any] = Field(default_factory=dict)
    wrap: list[WrapperConfig] = Field(
        default_factory=list, description="wrappers applied in turn (the first wraps the strategy)"
    )
    init: Literal["random", "rotation"] | None = Field(None, description="override the experiment's init")
    first_round: FirstRoundConfig | None = Field(None, description="a different strategy for the first acquisition")

    @property
    def label(self) -> str:
        if self.key:
            return self.key
        label = _with_params(self.name, self.params)
        for w in self.wrap:
            label = f"{_with_params(w.name, w.params)}({label})"
        if self.first_round:
            label = f"{self.first_round.label}>{label}"
        return label


class ExperimentConfig(_Section):
    name: str
    description: str = ""
    dataset: DatasetConfig
    bias: BiasConfig = BiasConfig()
    validation: ValidationConfig = ValidationConfig()
    model: ModelConfig
    init: Literal["random", "rotation"] = "random"
    pretrain: PretrainConfig = PretrainConfig()
    train: TrainConfig = TrainConfig()
    loop: LoopConfig
    device: str = "cpu"
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: cores / workers)")
    full_pool_accuracy: float | None = Field(None, description="reference line for plots (measured elsewhere)")
    strategies: list[StrategyConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_strategies(self) -> ExperimentConfig:
        labels = [s.label for s in self.strategies]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"strategies {dupes} appear twice: give each variant a distinct key")
        if self.train.select_by == "validation" and self.validation.per_class == 0:
            raise ValueError("train.select_by: validation needs validation.per_class > 0")
        return self

    def shared_fingerprint(self) -> str:
        """:meth:`fingerprint` without the strategies: what every job of the experiment shares. Two configs with
        the same shared fingerprint may differ in their strategy lists (an experiment can gain strategies)."""
        data = self.model_dump(
            mode="json",
            exclude={
                "name": True,
                "description": True,
                "threads": True,
                "strategies": True,
                "loop": {"keep_checkpoints", "runs"},
            },
        )
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """A hash of everything that changes results. The name, description and thread count do not; nor does
        the number of runs: every run is seeded by its own index, so run r is the same in a 3-run and a 5-run
        experiment, and an experiment can be extended with more runs. Options added later leave the fingerprint
        of configs that do not use them unchanged (an empty ``wrap``, no ``first_round``, ``stop_set`` 0 and no
        ``stop_when`` are left out). ``stop_when`` ends runs early, so it is part of the fingerprint when set."""
        data = self.model_dump(
            mode="json",
            exclude={"name": True, "description": True, "threads": True, "loop": {"keep_checkpoints", "runs"}},
        )
        for s in data["strategies"]:
            if not s["wrap"]:
                del s["wrap"]
            if s.get("first_round") is None:
                s.pop("first_round", None)
        for section, key, default in _OPTIONAL_FIELDS:  # options added later leave old fingerprints as they were
            if data.get(section, {}).get(key, default) == default:
                data.get(section, {}).pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


#: (section, field, default) of fields whose default must not change the fingerprint of older configs.
_OPTIONAL_FIELDS = [
    ("dataset", "clip_to", None),
    ("bias", "label_noise", 0.0),
    ("train", "class_weights", "none"),
    ("train", "prior_correction", False),
    ("loop", "stop_set", 0),
    ("loop", "stop_when", None),
]


def _format_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = _section_for(err["loc"][:-1])
            valid = ", ".join(parent.model_fields) if parent else "?"
            msg = f"unknown key; valid keys here: {valid}"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def parse_config(data: dict, source: str = "<dict>") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping")
    try:
        return ExperimentConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    except ValueError as exc:  # raised by validators outside pydantic's wrapping
        raise ConfigError(f"invalid config {source}: {exc}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error (YAML says keys are unique;
    PyYAML silently keeps the last, so a second ``train:`` section would reset the first to defaults)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class raises its own error for an unhashable key
            if key in seen:
                raise ConfigError(
                    f"{self._source}: key {key!r} appears twice in one mapping (line {seen[key]} and line "
                    f"{key_node.start_mark.line + 1}): keep one of them"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    _source = "<yaml>"


def parse_yaml(text: str, source: str = "<yaml>") -> object:
    """Parse YAML text with the unique-key safe loader; a syntax error becomes a ConfigError."""
    loader = None
    try:
        loader = _UniqueKeyLoader(text)
        loader._source = source
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source} is not valid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder: give the YAML file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} cannot be read: {exc}") from None
    return parse_config(parse_yaml(text, str(path)), str(path))
