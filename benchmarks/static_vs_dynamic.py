"""Why the compiled kernels are shape-specialized: inductor's static vs dynamic-shape kernel for x·Φ(λx) on CPU.

    python benchmarks/static_vs_dynamic.py [--numel 2129920] [--threads 2]

Prints the median time of the forward formula compiled with ``dynamic=False``
and ``dynamic=True`` (and ATen's ``F.gelu`` for scale), all in one run, and the
ratio dynamic ÷ static.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def _formula(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return x * torch.special.ndtr(lam * x)  # the compiled forward kernel's body: x·Φ(λx)


def _median_ms(fn: Callable[[], object], repeats: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=2_129_920, help="elements (default: one ViT gate of docs)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, lam = torch.randn(args.numel), torch.tensor(2.5)
    static = torch.compile(_formula, dynamic=False)
    dynamic = torch.compile(lambda x, lam: _formula(x, lam), dynamic=True)  # its own code object, own cache
    rows = {
        "F.gelu (ATen)": _median_ms(lambda: torch.nn.functional.gelu(x)),
        "compiled, dynamic=False": _median_ms(lambda: static(x, lam)),
        "compiled, dynamic=True": _median_ms(lambda: dynamic(x, lam)),
    }
    print(f"x·Φ(λx) forward, {args.numel} fp32 elements, {args.threads} threads, torch {torch.__version__}")
    for name, ms in rows.items():
        print(f"  {name:26s} {ms:7.3f} ms")
    print(f"  dynamic ÷ static: {rows['compiled, dynamic=True'] / rows['compiled, dynamic=False']:.2f}")


if __name__ == "__main__":
    main()
