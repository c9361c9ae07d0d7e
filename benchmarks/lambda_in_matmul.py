"""Probe: λ carried by the matmuls instead of the gate, for Linear → λ-GELU → Linear stacks (issue 13's idea).

For an MLP ``Linear → gate → … → Linear`` with one λ per gate, f(x; λ) = GELU(λx)/λ
lets every λ ride in the neighbouring matmuls: the layer before a gate writes
z = λ·(W h + b) with ``addmm(b, h, Wᵀ, beta=λ, alpha=λ/λ_prev)``, the gate is
ATen's own ``F.gelu(z)`` (so the forward costs exactly a GELU model's), and the
1/λ is folded into the next layer's ``alpha``. Each layer y = s·(W h/s_prev + b)
(s = λ of the gate after it, 1 for the last layer; s_prev = λ of the gate
before it, 1 for the first) is one autograd Function, whose backward gives

* ∂L/∂h = (s/s_prev)·g W, ∂L/∂W = (s/s_prev)·gᵀh, ∂L/∂b = s·Σᵢ g (the matmuls' alpha);
* ∂L/∂s = Σ g⊙y / s (y/s does not depend on s) and
  ∂L/∂s_prev = −(Σ g⊙y − s·b·Σᵢ g)/s_prev (y − s·b scales as 1/s_prev);

so ∂L/∂λ of a gate is the sum of two reductions (one from each neighbour) that
cancel to the small x²φ(λx) term: λ's gradient loses relative accuracy as λ grows.

This script measures, on the MLP 256-1024-1024-10 at batch 2048 (the one of
``benchmarks/train_step_speed.py``), in one run: the training step of the GELU
model, of the library's λ-GELU model, and of this prototype, round-robin; and
∂L/∂λ of the prototype and of the library in fp32 against the library's in float64,
at λ = 2, 10 and 100.

Usage: python benchmarks/lambda_in_matmul.py [--rounds 6] [--repeats 8] [--threads 2] [--out FILE] [--force]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import lambda_gelu as lg
from lambda_gelu.outputs import check_writable
from train_step_speed import make_batch, make_model  # the same MLP and batch

class _ScaledLinear(torch.autograd.Function):
    """y = s·(h Wᵀ / s_prev + b) by one addmm; the scales are 0-d tensors (s_prev = s = 1 where there is no gate)."""

    @staticmethod
    def forward(ctx, h, weight, bias, s_prev, s):  # type: ignore[override]
        alpha, beta = float(s) / float(s_prev), float(s)
        y = torch.addmm(bias, h, weight.t(), beta=beta, alpha=alpha)
        ctx.save_for_backward(h, weight, bias, y, s_prev, s)
        ctx.alpha, ctx.beta = alpha, beta
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        h, weight, bias, y, s_prev, s = ctx.saved_tensors
        alpha, beta = ctx.alpha, ctx.beta
        grad_h = torch.mm(g, weight).mul_(alpha) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(g.t(), h).mul_(alpha)  # ∂L/∂W = (s/s_prev)·gᵀh
        col = g.sum(0)
        grad_b = col * beta  # ∂L/∂b = s·Σᵢ g
        g_dot_y = torch.dot(g.reshape(-1), y.reshape(-1))  # Σ g⊙y
        grad_s = (g_dot_y / s).reshape(s.shape) if ctx.needs_input_grad[4] else None
        grad_s_prev = (-(g_dot_y - beta * torch.dot(col, bias)) / s_prev).reshape(s_prev.shape) \
            if ctx.needs_input_grad[3] else None
        return grad_h, grad_w, grad_b, grad_s_prev, grad_s


class MatmulLambdaMLP(nn.Module):
    """The MLP with λ in the matmuls: Linear layers, one log-λ per gate, F.gelu between them."""

    def __init__(self, reference: nn.Sequential) -> None:
        super().__init__()
        linears = [m for m in reference if isinstance(m, nn.Linear)]
        gates = [m for m in reference if isinstance(m, lg.LambdaGELU)]
        self.linears = nn.ModuleList(linears)
        self.log_lams = nn.ParameterList(nn.Parameter(g.log_lam.detach().clone().reshape(())) for g in gates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = torch.ones((), dtype=x.dtype)
        lams = [torch.exp(r) for r in self.log_lams]
        h, s_prev = x, one
        for i, linear in enumerate(self.linears):
            s = lams[i] if i < len(lams) else one
            h = _ScaledLinear.apply(h, linear.weight, linear.bias, s_prev, s)
            if i < len(lams):
                h = F.gelu(h)  # ATen's GELU on z = λ·(W h + b); its 1/λ rides in the next layer's alpha
            s_prev = s
        return h


def gelu_mlp() -> nn.Sequential:
    return make_model("mlp", "gelu")


def lambda_mlp(init: float) -> nn.Sequential:
    model = gelu_mlp()
    lg.convert(model, init=init)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return make_batch("mlp")


def lambda_grad_error(init: float) -> dict[str, float]:
    """The prototype's ∂L/∂(log λ) per gate against the library's in float64, and the outputs' max difference."""
    x, y = batch()
    reference = lambda_mlp(init).double()
    prototype = MatmulLambdaMLP(reference)
    out_ref = reference(x.double())
    F.cross_entropy(out_ref, y).backward()
    out_proto = prototype(x.double())
    F.cross_entropy(out_proto, y).backward()
    ref32 = lambda_mlp(init)
    proto32 = MatmulLambdaMLP(ref32)
    F.cross_entropy(ref32(x), y).backward()
    F.cross_entropy(proto32(x), y).backward()
    want = [g.log_lam.grad.reshape(()) for g in reference if isinstance(g, lg.LambdaGELU)]
    library32 = [g.log_lam.grad.reshape(()).double() for g in ref32 if isinstance(g, lg.LambdaGELU)]
    proto64 = [p.grad for p in prototype.log_lams]
    got32 = [p.grad.double() for p in proto32.log_lams]

    def worst(grads: list[torch.Tensor]) -> float:
        return max(float(abs(g - w) / abs(w)) for g, w in zip(grads, want))

    return {
        "max abs. output difference (fp64)": float((out_ref - out_proto).detach().abs().max()),
        "∂L/∂log λ rel. error, prototype fp64": worst(proto64),
        "∂L/∂log λ rel. error, prototype fp32": worst(got32),
        "∂L/∂log λ rel. error, library fp32": worst(library32),
    }


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.AdamW(lg.param_groups(model, lr=3e-4, weight_decay=0.05)
                                  if any(isinstance(m, lg.LambdaGELU) for m in model.modules())
                                  else model.parameters(), lr=3e-4, weight_decay=0.05)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the figures as JSON")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    out = check_writable(args.out, args.force) if args.out else None
    torch.set_num_threads(args.threads)
    x, y = batch()
    steps = {
        "GELU": make_step(gelu_mlp(), x, y),
        "λ-GELU (library, default path)": make_step(lambda_mlp(2.0), x, y),
        "λ in the matmuls (prototype)": make_step(MatmulLambdaMLP(lambda_mlp(2.0)), x, y),
    }
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    ratios: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        for name in steps:
            ratios[name].append(statistics.median(times[name]) / statistics.median(times["GELU"]))
    accuracy = {str(lam): lambda_grad_error(lam) for lam in (2.0, 10.0, 100.0)}
    print("| variant | step ÷ GELU step (median over rounds, range) |\n| --- | ---: |")
    for name, r in ratios.items():
        print(f"| {name} | {statistics.median(r):.3f} ({min(r):.2f}–{max(r):.2f}) |")
    print("\n| λ | " + " | ".join(next(iter(accuracy.values()))) + " |\n| ---: |" + " ---: |" * 4)
    for lam, row in accuracy.items():
        print(f"| {float(lam):g} | " + " | ".join(f"{v:.1e}" for v in row.values()) + " |")
    if out is not None:
        command = " ".join(["python", "benchmarks/lambda_in_matmul.py", *(sys.argv[1:] if argv is None else argv)])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": command, "torch": torch.__version__, "threads": args.threads,
                                   "ratios": ratios, "accuracy": accuracy}, indent=2))
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
