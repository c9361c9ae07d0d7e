"""How far λ moves per step, naive parameterization vs. lambda-gelu's scheme, under SGD and AdamW.

Two measurements on a fixed batch of pre-activations x ~ N(0, 1):

1. *Attenuation.* Loss = mean (f(x; λ) − ReLU(x))², which always asks for a
   harder gate. From λ0 ∈ {1, 1.5, 10, 100, 1000}, the mean |Δ log λ| per step
   over steps 21-40 (after momentum has built up). Naive: λ itself is an ``nn.Parameter``; its gradient falls
   like λ⁻³, so its steps vanish. lambda-gelu: ρ = log λ (projected to ρ ≥ 0) with the
   normalized, optimizer-aware update of ``param_groups``.
2. *Sustained hardening.* The same loss from λ0 = 1.5 for 300 steps: λ
   reached, and mean |Δ log λ| over the last 50 steps (in lambda-gelu's case
   as a fraction of ``hardness_lr``: the normalization must keep up with a
   gradient that shrinks as λ grows).
3. *Settling.* Loss = mean (f(x; λ) − y)², y = f(x; 5) + 0.05·noise, on
   minibatches of 256 drawn from 65536 inputs: λ should settle at 5. From λ0 = 1.5, 1000 steps: mean λ
   over the last 200 steps, the spread (std of log λ) there, and the number
   of sign changes of Δλ there (out of 199).

Usage: python benchmarks/lambda_steps.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
from torch import nn

from lambda_gelu import LambdaGELU, lambda_gelu, param_groups

HARDNESS_LR = 0.02
METHODS: list[tuple[str, str, float]] = [  # (parameterization, optimizer, learning rate of λ)
    ("naive", "sgd", 0.5),
    ("naive", "sgd", 50.0),
    ("naive", "adamw", 0.02),
    ("lambda-gelu", "sgd", HARDNESS_LR),
    ("lambda-gelu", "adamw", HARDNESS_LR),
]


class NaiveGate(nn.Module):
    """λ as a plain parameter (what one would write first)."""

    def __init__(self, lam: float) -> None:
        super().__init__()
        self.lam_param = nn.Parameter(torch.tensor(float(lam)))

    @property
    def lam(self) -> torch.Tensor:
        return self.lam_param.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lambda_gelu(x, self.lam_param)


def make(kind: str, optimizer: str, lr: float, lam0: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    if kind == "naive":
        gate: nn.Module = NaiveGate(lam0)
        groups = [{"params": list(gate.parameters()), "lr": lr}]
    else:
        gate = LambdaGELU(init=lam0)
        groups = param_groups(gate, lr=1e-3, hardness_lr=lr)
    if optimizer == "sgd":
        return gate, torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return gate, torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def run(
    method: tuple[str, str, float],
    lam0: float,
    target: torch.Tensor,
    x: torch.Tensor,
    steps: int,
    batch: int | None = None,
) -> list[float]:
    """λ after each of ``steps`` steps (full batch, or minibatches of ``batch``)."""
    gate, opt = make(*method, lam0)
    lams = [float(gate.lam)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        index = slice(None) if batch is None else torch.randint(len(x), (batch,), generator=generator)
        loss = (gate(x[index]) - target[index]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lams.append(float(gate.lam))
    return lams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(4096)
    results: dict[str, object] = {"attenuation": [], "sustained": [], "settling": []}
    print("Attenuation: mean |Δ log λ| per step over steps 21-40, loss asks for harder gates")
    print(f"| method | optimizer | lr | {' | '.join(f'λ0 = {v:g}' for v in (1, 1.5, 10, 100, 1000))} |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    relu_target = torch.relu(x)
    for method in METHODS:
        cells = []
        for lam0 in (1.0, 1.5, 10.0, 100.0, 1000.0):
            lams = run(method, lam0, relu_target, x, 40)[20:]
            step = sum(abs(math.log(b) - math.log(a)) for a, b in itertools.pairwise(lams)) / 20
            cells.append(step)
            results["attenuation"].append(  # type: ignore[union-attr]
                {"method": method[0], "optimizer": method[1], "lr": method[2], "lam0": lam0,
                 "mean_abs_dlog_lam": step}
            )
        print(f"| {method[0]} | {method[1]} | {method[2]:g} | {' | '.join(f'{c:.2e}' for c in cells)} |")
    print("\nSustained hardening from λ0 = 1.5, 300 steps")
    print("| method | optimizer | lr | λ after 300 steps | mean |Δ log λ|, steps 251-300 | ÷ hardness_lr |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for method in METHODS:
        lams = run(method, 1.5, relu_target, x, 300)
        tail = lams[-51:]
        step = sum(abs(math.log(b) - math.log(a)) for a, b in itertools.pairwise(tail)) / 50
        results["sustained"].append(  # type: ignore[union-attr]
            {"method": method[0], "optimizer": method[1], "lr": method[2], "final": lams[-1], "step": step}
        )
        ratio = f"{step / method[2]:.2f}" if method[0] == "lambda-gelu" else "–"
        print(f"| {method[0]} | {method[1]} | {method[2]:g} | {lams[-1]:.4g} | {step:.2e} | {ratio} |")
    print("\nSettling at λ = 5 from λ0 = 1.5, minibatches of 256, 1000 steps; last 200 steps:")
    print("| method | optimizer | lr | largest λ seen | mean λ | std of log λ | sign changes of Δλ (of 199) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    pool = torch.randn(65536)
    teacher = lambda_gelu(pool, 5.0).detach() + 0.05 * torch.randn(65536)  # noisy targets: noisy gradients
    for method in METHODS:
        lams = run(method, 1.5, teacher, pool, 1000, batch=256)
        tail = torch.tensor(lams[-200:], dtype=torch.float64)
        deltas = tail.diff()
        flips = int((deltas[1:] * deltas[:-1] < 0).sum())
        row = {"method": method[0], "optimizer": method[1], "lr": method[2], "max": max(lams),
               "mean": float(tail.mean()), "std_log": float(tail.log().std()), "sign_changes": flips}
        results["settling"].append(row)  # type: ignore[union-attr]
        print(f"| {method[0]} | {method[1]} | {method[2]:g} | {row['max']:.4g} | {row['mean']:.4g} | "
              f"{row['std_log']:.2e} | {flips} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
