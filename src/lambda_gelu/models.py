"""Reference models that take their activation as an argument, and the activation factory."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import nn

from lambda_gelu.module import LambdaGELU

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "lambda_gelu": LambdaGELU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (see ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """Flatten → [Linear → activation] × len(hidden) → Linear.

    The activations are named ``blocks.<i>.act``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128, 128, 128),
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        widths = [in_features, *hidden]
        self.blocks = nn.ModuleList(
            nn.Sequential(OrderedDict(fc=nn.Linear(w_in, w_out), act=make_activation(activation)))
            for w_in, w_out in itertools.pairwise(widths)
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.flatten(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name with keyword arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
