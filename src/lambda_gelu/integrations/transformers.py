"""Hugging Face transformers: which config fields name a GELU, and ReLU configs for ``relufy``.

Imported by :func:`lambda_gelu.relufy` only once the program has imported
transformers (a program that holds a transformers model has); ``import
lambda_gelu`` never imports transformers, and this module imports nothing of
lambda-gelu's conversion back.

**Which classes are GELU** is decided by :mod:`lambda_gelu.gelu_types` for every
module alike: transformers' activation classes are parameter-free leaves whose
output is compared with both GELU forms, and QuickGELU or ClippedGELU, which say
GELU but compute another function, are refused as look-alikes.

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

from torch import nn

from lambda_gelu.gates import activation_layers
from lambda_gelu.gelu_types import is_gelu, lookalike_reason


class RelufyConfigWarning(UserWarning):
    """``relufy`` could not make a transformers config describe the ReLU model it produced."""


def gelu_activation_names() -> set[str]:
    """Names of transformers' ``ACT2CLS`` entries whose activation is GELU-family (user registrations included).

    Building every entry makes some log a notice ("CUDA-fused xIELU not
    available"); transformers is kept at error level meanwhile, which marks
    such a once-only notice as given in this process.
    """
    from transformers.activations import ACT2FN
    from transformers.utils import logging as hf_logging

    names = set()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # building every entry to test it is ours, not the user's: no "not available"
    try:
        for name in ACT2FN:
            try:
                module = ACT2FN[name]
            except Exception:  # an entry that cannot be built here is not one we can judge
                continue
            if isinstance(module, nn.Module) and is_gelu(module):
                names.add(name)
    finally:
        hf_logging.set_verbosity(verbosity)
    return names


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
    """Qualified names of the gate modules inside ``module`` that are not ReLU yet (λ-GELU, GELU, look-alikes)."""
    return list(activation_layers(module)) + [
        name for name, sub in module.named_modules() if lookalike_reason(sub) is not None
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
