"""Hugging Face transformers: its GELU activation classes for ``convert``, and ReLU configs for ``relufy``.

Loaded on demand by :mod:`lambda_gelu.convert` once ``transformers.activations``
is in ``sys.modules`` (a program that holds a transformers model has imported
it); ``import lambda_gelu`` never imports transformers.

**Which classes are GELU.** Every entry of transformers' ``ACT2CLS`` whose name
contains ``gelu`` is instantiated through ``ACT2FN`` and evaluated in float64 on
[-20, 20]. An entry that matches ``F.gelu`` (erf form) or ``F.gelu(...,
approximate="tanh")`` within 1e-6·max(1, |x|) is registered as that form
(GELUActivation, NewGELUActivation, GELUTanh = PytorchGELUTanh,
FastGELUActivation, AccurateGELUActivation at the time of writing). No hand list:
a class transformers adds later is classified the same way.

**Look-alikes are refused.** An entry named ``*gelu*`` that matches neither form
(QuickGELU x·σ(1.702x), differing from GELU by up to 0.020; ClippedGELU
``gelu_10``, which clips at ±10) is recorded in
:data:`lambda_gelu.convert.GELU_LOOKALIKES`, and :func:`lambda_gelu.convert`
raises :class:`lambda_gelu.convert.NotGELUError` on it instead of converting.
Converting would silently change the function the model computes (x·Φ(x) is not
x·σ(1.702x)) while the converted model is promised to equal the original at
λ = 1; the λ profile, the calibration that sets the targets and the accounting
of what the ReLU swap cost would all start from a model the user never had. A
user who accepts the change says so once, explicitly:
``lambda_gelu.register_gelu_type(QuickGELUActivation, "none")``.

**ReLU configs.** After :func:`lambda_gelu.relufy`, every ``PreTrainedModel``
inside the model whose gates are now all ``nn.ReLU`` gets each activation field
of its config (a key containing ``act`` whose value names a GELU entry of
``ACT2CLS``: ``hidden_act``, ``hidden_activation``, ``activation_function``, …,
in nested sub-configs too) set to ``"relu"``, so ``save_pretrained`` writes a
model that stock transformers loads as a ReLU model without lambda-gelu.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lambda_gelu.convert import GELU_LOOKALIKES, GELU_REGISTRY, is_gelu, lookalike_reason
from lambda_gelu.module import LambdaGELU

GRID_LIMIT = 20.0
"""Activations are compared with GELU on [-GRID_LIMIT, GRID_LIMIT] (wide enough to see ClippedGELU's clip at 10)."""

MATCH_TOLERANCE = 1e-6
"""A class is GELU if |f − GELU| <= MATCH_TOLERANCE·max(1, |x|) on the grid (FastGELU's rounded constant: 1e-12)."""


class RelufyConfigWarning(UserWarning):
    """``relufy`` could not make a transformers config describe the ReLU model it produced."""


def _grid() -> torch.Tensor:
    return torch.linspace(-GRID_LIMIT, GRID_LIMIT, 4001, dtype=torch.float64)


@torch.no_grad()
def classify_activation(module: nn.Module) -> tuple[str | None, float]:
    """(``"none"`` | ``"tanh"`` | None, largest |f − GELU| on the grid) for an elementwise activation module.

    The form is the GELU form the module computes, or None when it matches
    neither; the number is its deviation from the nearer form.
    """
    x = _grid()
    y = module(x).double()
    scale = x.abs().clamp(min=1.0)
    deviation = {form: (y - F.gelu(x, approximate=form)).abs() for form in ("none", "tanh")}
    best = min(deviation, key=lambda form: float((deviation[form] / scale).max()))
    matches = bool((deviation[best] <= MATCH_TOLERANCE * scale).all())
    return (best if matches else None), float(deviation[best].max())


def _entry_class(entry: Any) -> type:
    return entry[0] if isinstance(entry, tuple) else entry


def _gelu_entries() -> dict[str, tuple[type, str | None, float]]:
    """``{ACT2CLS name: (class, form or None, deviation)}`` for the names that contain ``gelu``."""
    from transformers.activations import ACT2CLS, ACT2FN

    entries: dict[str, tuple[type, str | None, float]] = {}
    for name, entry in ACT2CLS.items():
        if "gelu" not in name.lower():
            continue
        try:
            form, deviation = classify_activation(ACT2FN[name])
        except Exception:  # an entry that cannot run on a float64 CPU tensor is not ours to judge
            continue
        entries[name] = (_entry_class(entry), form, deviation)
    return entries


def register_transformers_activations() -> None:
    """Register transformers' GELU classes with :func:`lambda_gelu.register_gelu_type`; record look-alikes.

    Classes the user registered already are left as they are. Idempotent.
    """
    by_class: dict[type, list[tuple[str, str | None, float]]] = {}
    for name, (cls, form, deviation) in _gelu_entries().items():
        by_class.setdefault(cls, []).append((name, form, deviation))
    for cls, rows in by_class.items():
        if cls in GELU_REGISTRY:
            continue
        forms = {form for _name, form, _dev in rows}
        if len(forms) == 1 and None not in forms:
            (form,) = forms
            GELU_REGISTRY[cls] = lambda _module, form=form: form
        elif None not in forms:  # one class, both forms depending on its arguments: judge each instance
            GELU_REGISTRY[cls] = lambda module: classify_activation(module)[0]
        else:
            name, _form, deviation = max(rows, key=lambda row: row[2])
            GELU_LOOKALIKES.setdefault(
                cls,
                f"{cls.__name__} (transformers' {name!r}) is neither x·Φ(x) nor its tanh form: it differs "
                f"from GELU by up to {deviation:.3g} on [-{GRID_LIMIT:g}, {GRID_LIMIT:g}]",
            )


def gelu_activation_names() -> set[str]:
    """Names of ``ACT2CLS`` entries that are GELU-family now (after registration, user registrations included)."""
    from transformers.activations import ACT2CLS

    return {
        name
        for name, entry in ACT2CLS.items()
        if any(cls in GELU_REGISTRY for cls in _entry_class(entry).__mro__)
    }


def _sub_configs(config: Any) -> list[tuple[str, Any]]:
    from transformers import PretrainedConfig

    return [(key, value) for key, value in vars(config).items() if isinstance(value, PretrainedConfig)]


def activation_fields(config: Any, names: set[str] | None = None, prefix: str = "config") -> list[tuple[Any, str, str]]:
    """``(config object, key, dotted path)`` of every activation field whose value names a GELU entry.

    A field is a key containing ``act`` (``hidden_act``, ``hidden_activation``,
    ``activation_function``, ``dense_act_fn``, …) with a string value in
    ``names`` (default: :func:`gelu_activation_names`); nested sub-configs
    (``text_config``, ``vision_config``, …) are searched too.
    """
    names = gelu_activation_names() if names is None else names
    fields = []
    for key, value in vars(config).items():
        if isinstance(value, str) and "act" in key.lower() and value in names:
            fields.append((config, key, f"{prefix}.{key}"))
    for key, sub in _sub_configs(config):
        fields += activation_fields(sub, names, f"{prefix}.{key}")
    return fields


def _smooth_gates(module: nn.Module) -> list[str]:
    """Qualified names of the gates inside ``module`` that are not ReLU yet (λ-GELU, GELU, look-alikes)."""
    return [
        name
        for name, sub in module.named_modules()
        if isinstance(sub, LambdaGELU) or is_gelu(sub) or lookalike_reason(sub) is not None
    ]


def set_relu_config(model: nn.Module, changed: Sequence[str]) -> list[str]:
    """Point the activation fields of every fully-ReLU ``PreTrainedModel`` in ``model`` to ``"relu"``.

    ``changed`` are the qualified names that :func:`lambda_gelu.relufy` just
    swapped. A ``PreTrainedModel`` that holds one of them but still holds a
    smooth gate (a partial relufy) keeps its config and gets a
    :class:`RelufyConfigWarning`: one ``hidden_act`` cannot describe a mixed
    model. So does a config that does not keep ``"relu"`` through
    ``to_dict``/``from_dict`` (a config class that rederives the activation
    from another field). Returns the dotted paths set, e.g. ``["config.hidden_act"]``.
    """
    from transformers import PreTrainedModel

    names = gelu_activation_names()
    done: set[int] = set()
    paths: list[str] = []
    for prefix, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel) or id(sub.config) in done:
            continue
        inside = [n for n in changed if not prefix or n.startswith(prefix + ".")]
        if not inside:
            continue
        done.add(id(sub.config))
        smooth = _smooth_gates(sub)
        fields = activation_fields(sub.config, names)
        if smooth:
            warnings.warn(
                f"{type(sub).__name__}: {len(smooth)} gate(s) are not ReLU yet ({', '.join(smooth[:3])}); "
                f"its config keeps {', '.join(f'{p}={getattr(c, k)!r}' for c, k, p in fields) or 'its activation'}, "
                "so save_pretrained would not describe this model",
                RelufyConfigWarning,
                stacklevel=3,
            )
            continue
        for config, key, path in fields:
            setattr(config, key, "relu")
            paths.append(path)
        _check_round_trip(sub.config, fields)
    return paths


def _check_round_trip(config: Any, fields: list[tuple[Any, str, str]]) -> None:
    """Warn if a field set to "relu" does not survive to_dict → from_dict (what save/load does)."""
    if not fields:
        return
    reloaded = type(config).from_dict(config.to_dict())
    lost = []
    for _config, key, path in fields:
        target = reloaded
        for part in path.split(".")[1:-1]:
            target = getattr(target, part)
        if getattr(target, key, None) != "relu":
            lost.append(f"{path} reloads as {getattr(target, key, None)!r}")
    if lost:
        warnings.warn(
            f"{type(config).__name__} does not keep the ReLU activation through save/load: {'; '.join(lost)}",
            RelufyConfigWarning,
            stacklevel=4,
        )
