"""Build any model of the package by name: ``create_model("vit_small_patch16_224", num_classes=10)``.

Each registered name maps to a model class and the keyword arguments that define
it; overrides replace those defaults. The baselines live in the same registry so
that the training pipeline treats every model alike.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: the constructor and the keyword arguments that define the variant."""

    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def arguments(self) -> dict[str, Any]:
        """Every keyword the builder accepts, with the variant's value or the builder's default."""
        params = inspect.signature(self.builder).parameters
        values = {k: p.default for k, p in params.items()
                  if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return {**values, **self.defaults}


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, builder: Callable[..., nn.Module], description: str = "", **defaults: Any) -> None:
    """Register ``name`` as ``builder(**defaults)``; re-registering a name is an error."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelSpec(name, builder, dict(defaults), description)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names, sorted, optionally filtered by a shell pattern such as ``'vit_*'``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_model_spec(name: str) -> ModelSpec:
    """The registered spec, or a ValueError that lists the closest names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=5, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"registered: {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}; {hint}") from None


def create_model(name: str, init_from: str | None = None, **overrides: Any) -> nn.Module:
    """Instantiate a registered model, replacing any of its defining arguments.

    ``init_from`` starts it from pretrained weights (a file, a hub folder or ``timm:NAME``; see
    :func:`vit.pretrained.load_pretrained`), fitted to the model: a head for another class count
    is left freshly initialised, position embeddings follow the patch grid.
    """
    spec = get_model_spec(name)
    accepted = spec.arguments()
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} has no argument(s) {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(sorted(accepted))}"
        )
    model = spec.builder(**{**spec.defaults, **overrides})
    if init_from is not None:
        from vit.pretrained import load_pretrained  # reading checkpoints is only needed here

        load_pretrained(model, init_from)
    return model
