"""Target hardness for Gaussian pre-activations: κ* = λ*·σ for several tolerances τ, and D(κ) for several κ.

For x ~ N(0, σ²), f(x; λ) depends on λ and σ only through κ = λσ, so one
table serves every layer whose pre-activations are roughly Gaussian. Uses the
library's own ``discrepancy`` and ``target_lambda`` on 2^21 samples of N(0, 1).

Usage: python benchmarks/discrepancy_table.py
"""

from __future__ import annotations

import torch

from lambda_gelu import discrepancy, target_lambda


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1 << 21, dtype=torch.float64)
    print("| κ = λσ | D(κ) | 0.05/κ³ | sup|f − ReLU| / σ = 0.17/κ |")
    print("| ---: | ---: | ---: | ---: |")
    for kappa in (1, 2, 5, 10, 20, 50, 100):
        d = float(discrepancy(x, kappa))
        print(f"| {kappa} | {d:.2e} | {0.05 / kappa**3:.2e} | {0.16997 / kappa:.2e} |")
    print()
    print("| τ | κ* (smallest κ with D <= τ) | relative RMS change at the swap √τ |")
    print("| ---: | ---: | ---: |")
    for tau in (1e-3, 1e-4, 1e-5, 1e-6):
        print(f"| {tau:g} | {float(target_lambda(x, tau)):.2f} | {tau**0.5:.2%} |")


if __name__ == "__main__":
    main()
