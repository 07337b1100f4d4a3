"""The lpreg configuration: the typed tree (``lpreg_core.config_schema``, re-exported here),
loaded from one YAML file (the same file is a ConfigMap in Kubernetes) with dotted overrides from
the command line (``learner.steps=20``, ``learner.loss.type=grpo`` switches a typed variant).
Every field is documented; ``lpreg config fields`` prints the reference. Secrets (auth token,
Redis password) never live here: the config names the environment variable that holds them.
Errors name the file and the field, with a "did you mean" for typos.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError

from lpreg_core.config_schema import (
    AdamWConfig,
    ArithmeticTaskConfig,
    BackendConfig,
    BroadcastConfig,
    CheckpointConfig,
    ControlConfig,
    GeneratorConfig,
    HFBackendConfig,
    JsonlTaskConfig,
    LearnerConfig,
    LocalConfig,
    LoggerName,
    MetricsConfig,
    ModelConfig,
    OffPolicyConfig,
    RedisConfig,
    RunConfig,
    SamplingConfig,
    TaskConfig,
    VLLMBackendConfig,
    redis_url_problem,
)

__all__ = [
    "AdamWConfig",
    "ArithmeticTaskConfig",
    "BackendConfig",
    "BroadcastConfig",
    "CheckpointConfig",
    "ConfigError",
    "ControlConfig",
    "GeneratorConfig",
    "HFBackendConfig",
    "JsonlTaskConfig",
    "LearnerConfig",
    "LocalConfig",
    "LoggerName",
    "MetricsConfig",
    "ModelConfig",
    "OffPolicyConfig",
    "RedisConfig",
    "RunConfig",
    "SamplingConfig",
    "TaskConfig",
    "VLLMBackendConfig",
    "apply_override",
    "dump_config",
    "load_config",
    "models_in",
    "redis_url_problem",
    "tree_get",
    "variants_of",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field."""


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (one, or each member of a typed variant)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]
    return []


def variants_of(annotation: Any) -> dict[str, type[BaseModel]]:
    """``type`` value -> model, when the annotation is a typed variant (else empty)."""
    found: dict[str, type[BaseModel]] = {}
    for m in models_in(annotation):
        field = m.model_fields.get("type")
        if field is None:
            continue
        for value in typing.get_args(field.annotation):
            found[str(value)] = m
    return found if len(set(found.values())) > 1 else {}


def _variant_of(variants: dict[str, type[BaseModel]], node: dict[str, Any], default: Any) -> str:
    current = node.get("type")
    if current is None and isinstance(default, BaseModel):
        current = getattr(default, "type", None)
    return str(current)


def _model_at(tree: dict[str, Any], parts: list[str]) -> type[BaseModel] | None:
    """The config model at a dotted path of ``tree`` (following each variant's ``type``)."""
    model: type[BaseModel] = RunConfig
    node: Any = tree
    for part in parts:
        field = model.model_fields.get(part)
        if field is None:
            return None
        node = node.get(part, {}) if isinstance(node, dict) else {}
        models = models_in(field.annotation)
        if not models:
            return None
        variants = variants_of(field.annotation)
        if variants:
            default = field.get_default(call_default_factory=True)
            name = _variant_of(variants, node if isinstance(node, dict) else {}, default)
            if name not in variants:
                return None
            model = variants[name]
        else:
            model = models[0]
    return model


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return ""


def _format_validation_error(err: ValidationError, source: str, tree: dict[str, Any]) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        # A typed variant's tag appears in the location (learner.loss.grpo.kappa): drop it.
        loc = [str(p) for p in e["loc"]]
        path: list[str] = []
        model: type[BaseModel] | None = RunConfig
        for p in loc:
            if (
                model is not None
                and p not in model.model_fields
                and path
                and p in variants_of(_field_annotation(path))
            ):
                continue
            path.append(p)
            model = _model_at(tree, path)
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and path:
            parent = _model_at(tree, path[:-1]) if len(path) > 1 else RunConfig
            if parent is not None:
                msg = f"unknown field{_did_you_mean(path[-1], list(parent.model_fields))}"
                kind = getattr(tree_get(tree, path[:-1]), "get", lambda _k: None)("type")
                if kind is not None:
                    msg += f" (not a field of the {kind!r} variant)"
        lines.append(f"  {'.'.join(path) or '<root>'}: {msg}")
    return "\n".join(lines)


def _field_annotation(path: list[str]) -> Any:
    model: type[BaseModel] = RunConfig
    annotation: Any = None
    for part in path:
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        models = models_in(annotation)
        if not models:
            return annotation
        model = models[0]
    return annotation


def tree_get(tree: dict[str, Any], parts: list[str]) -> Any:
    node: Any = tree
    for part in parts:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def apply_override(
    tree: dict[str, Any], dotted: str, *, set_by_overrides: set[str] | None = None
) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML.

    Setting a typed variant's ``type`` to another variant (``learner.loss.type=grpo``) switches
    the variant: the old variant's fields are dropped, so the new one starts from its own
    defaults; fields set by earlier overrides (``set_by_overrides``, dotted keys) are kept.
    """
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like section.field=value")
    key, raw = dotted.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {dotted!r} has an empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {dotted!r}: the value is not valid YAML ({e})") from None
    model: type[BaseModel] | None = RunConfig
    node = tree
    for i, part in enumerate(parts[:-1]):
        if model is not None and part not in model.model_fields:
            raise ConfigError(
                f"override {dotted!r}: {'.'.join(parts[: i + 1])!r} is not a config field"
                f"{_did_you_mean(part, list(model.model_fields))}"
            )
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
        model = _model_at(tree, parts[: i + 1])
    last = parts[-1]
    if model is not None and last not in model.model_fields:
        variant = node.get("type")
        raise ConfigError(
            f"override {dotted!r}: {key.strip()!r} is not a config field"
            f"{_did_you_mean(last, list(model.model_fields))}"
            + (f" (not a field of the {variant!r} variant)" if variant else "")
        )
    if last == "type" and len(parts) > 1:
        annotation = _field_annotation(parts[:-1])
        variants = variants_of(annotation)
        if variants and value not in variants:
            raise ConfigError(
                f"override {dotted!r}: {'.'.join(parts[:-1])}.type must be one of "
                f"{', '.join(sorted(variants))}{_did_you_mean(str(value), list(variants))}"
            )
        parent_model = _model_at(tree, parts[:-2]) if len(parts) > 2 else RunConfig
        field = parent_model.model_fields.get(parts[-2]) if parent_model is not None else None
        default = field.get_default(call_default_factory=True) if field is not None else None
        if variants and _variant_of(variants, node, default) != str(value):
            prefix = ".".join(parts[:-1]) + "."
            kept = {
                k: v
                for k, v in node.items()
                if set_by_overrides is not None and f"{prefix}{k}" in set_by_overrides
            }
            node.clear()
            node.update(kept)
    node[last] = value
    if set_by_overrides is not None:
        set_by_overrides.add(".".join(parts))


def _drop_variant_nulls(tree: dict[str, Any], model: type[BaseModel] = RunConfig) -> None:
    """In a typed variant's block, ``null`` means "not set" (the variant's default). Helm merges
    a values file's block into the example's, so switching the chart's ``config.learner.loss``
    to another type clears the old variant's fields with ``--set config.learner.loss.kappa=null``
    (docs/deploy.md)."""
    for name, field in model.model_fields.items():
        node = tree.get(name)
        if not isinstance(node, dict):
            continue
        variants = variants_of(field.annotation)
        if variants:
            for key in [k for k, v in node.items() if v is None and k != "type"]:
                del node[key]
            default = field.get_default(call_default_factory=True)
            chosen = variants.get(_variant_of(variants, node, default))
            if chosen is not None:
                _drop_variant_nulls(node, chosen)
            continue
        models = models_in(field.annotation)
        if models:
            _drop_variant_nulls(node, models[0])


def _read_yaml(path: Path) -> Any:
    try:
        with open(path) as f:  # a stream, so YAML errors name the file
            return yaml.safe_load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except IsADirectoryError as e:
        raise ConfigError(f"config file {path} is a directory; pass a YAML file") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from a YAML file (or defaults when path is None) plus dotted overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        loaded = _read_yaml(Path(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded or {}
    if overrides:
        source += " with --set " + " ".join(overrides)
    set_by_overrides: set[str] = set()
    for item in overrides or []:
        apply_override(tree, item, set_by_overrides=set_by_overrides)
    _drop_variant_nulls(tree)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source, tree)) from None


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (what services log at start-up)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
