"""Whole training steps (forward + backward + AdamW step) of a ViT and a char-level GPT: GELU vs λ-GELU vs ReLU.

The models are the library's own (``build_model("vit")``, ``build_model("gpt")``),
sized so that every gate sees about 2M elements per step (above the op's
compile threshold). λ-GELU is set up as a user would: the GELU model is
converted with ``lambda_gelu.convert`` (a learnable λ per layer) and trained
with ``AdamW(lambda_gelu.param_groups(...))``, which adds the hardness group and
its normalized update; the GELU and ReLU models use the same ``param_groups``
call (no hardness group). λ-GELU is timed on its compiled path and on its
eager fallback.

After ``--warmup`` steps of each (which also compile the op's kernels), the
variants are timed round-robin (one step of each in turn), ``--repeats`` steps
per round; each ratio is the median over ``--rounds`` rounds of the ratio of
that round's median step times, reported with its range over the rounds.

Usage: python benchmarks/train_step_speed.py [--out runs/train_step_speed.json] [--force]
       [--repeats 5] [--rounds 4] [--warmup 3] [--threads 2] [--profile]
       python benchmarks/train_step_speed.py --from-json runs/train_step_speed.json   (tables only, no measuring)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lambda_gelu as lg
from lambda_gelu import kernels
from lambda_gelu.models import build_model
from lambda_gelu.outputs import check_writable

VIT = dict(num_classes=10, image_size=32, patch_size=4, in_channels=3, dim=128, depth=4, heads=4, mlp_ratio=4.0)
VIT_BATCH = 64  # 65 tokens × 512 hidden × 64 = 2.1M elements per gate
GPT = dict(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128, mlp_ratio=4.0)
GPT_BATCH = 32  # 128 tokens × 512 hidden × 32 = 2.1M elements per gate


def make_model(kind: str, activation: str) -> nn.Module:
    """The ViT or GPT with ``activation`` ("gelu", "relu", or "lambda_gelu" by converting the GELU model)."""
    torch.manual_seed(0)
    config = VIT if kind == "vit" else GPT
    model = build_model(kind, activation="relu" if activation == "relu" else "gelu", **config)
    if activation == "lambda_gelu":
        lg.convert(model, init=2.0)  # one learnable λ per layer
    return model.train()


def make_batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if kind == "vit":
        x = torch.randn(VIT_BATCH, 3, 32, 32, generator=generator)
        return x, torch.randint(0, 10, (VIT_BATCH,), generator=generator)
    idx = torch.randint(0, GPT["vocab_size"], (GPT_BATCH, GPT["block_size"] + 1), generator=generator)
    return idx[:, :-1], idx[:, 1:]


def make_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(lg.param_groups(model, lr=3e-4, weight_decay=0.05))
    x, y = batch

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


VARIANTS: dict[str, tuple[str, str | None]] = {
    # name → (activation, compile mode for the λ-GELU op)
    "GELU": ("gelu", None),
    "λ-GELU compiled": ("lambda_gelu", "on"),
    "λ-GELU eager": ("lambda_gelu", "off"),
    "ReLU": ("relu", None),
}


def measure(kind: str, warmup: int, repeats: int, rounds: int) -> dict:
    """Step times of every variant: ``rounds`` rounds of ``repeats`` round-robin steps each, after ``warmup``."""
    batch = make_batch(kind)
    steps = {name: (mode, make_step(make_model(kind, act), batch)) for name, (act, mode) in VARIANTS.items()}
    for _ in range(warmup):
        for mode, step in steps.values():
            kernels.set_compile_mode(mode)
            step()
    times: list[dict[str, list[float]]] = []
    for _ in range(rounds):
        times.append({name: [] for name in steps})
        for _ in range(repeats):
            for name, (mode, step) in steps.items():
                kernels.set_compile_mode(mode)
                start = time.perf_counter()
                step()
                times[-1][name].append(time.perf_counter() - start)
    kernels.set_compile_mode(None)
    ratios = {
        name: [statistics.median(r[name]) / statistics.median(r["GELU"]) for r in times] for name in steps
    }
    model = make_model(kind, "gelu")
    gate_numel = []
    hooks = [m.register_forward_hook(lambda _m, inp, _o: gate_numel.append(inp[0].numel()))
             for m in model.modules() if isinstance(m, nn.GELU)]
    with torch.no_grad():
        model(batch[0])
    for hook in hooks:
        hook.remove()
    return {
        "model": kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "gates": len(gate_numel),
        "elements_per_gate": gate_numel[0] if gate_numel else 0,
        "step_s": {name: statistics.median(t for r in times for t in r[name]) for name in steps},
        "ratio": {name: statistics.median(r) for name, r in ratios.items()},
        "ratio_range": {name: [min(r), max(r)] for name, r in ratios.items()},
        "step_s_all": times,
    }


def gate_profile(kind: str, steps: int = 3) -> dict[str, float]:
    """Per-step time (ms) that torch.profiler attributes to the gates and to the whole step, GELU vs λ-GELU compiled.

    Gate time: ``aten::gelu`` + ``aten::gelu_backward`` for GELU; the compiled
    forward and backward graphs (``CompiledFxGraph``) for λ-GELU, which are the
    only compiled graphs in these models.
    """
    batch = make_batch(kind)
    profile: dict[str, float] = {}
    for name, activation, mode in (("GELU", "gelu", None), ("λ-GELU compiled", "lambda_gelu", "on")):
        kernels.set_compile_mode(mode)
        step = make_step(make_model(kind, activation), batch)
        for _ in range(2):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        gate_us = sum(
            e.self_cpu_time_total for e in prof.key_averages()
            if e.key in ("aten::gelu", "aten::gelu_backward") or "CompiledFxGraph" in e.key
        )
        total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
        profile[f"{name} gates ms/step"] = gate_us / steps / 1e3
        profile[f"{name} step ms (profiled)"] = total_us / steps / 1e3
    kernels.set_compile_mode(None)
    return profile


def tables(results: list[dict]) -> str:
    """The Markdown tables of measured (or saved) results: step ratios, and the gate profile where present."""
    names = list(VARIANTS)
    lines = ["| model | GELU step ms | " + " | ".join(f"{n} ÷ GELU" for n in names[1:]) + " |"]
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in names[1:]) + " |")
    for r in results:
        label = (f"{r['model']} ({r['parameters'] / 1e6:.2f}M params, {r['gates']} gates × "
                 f"{r['elements_per_gate'] / 1e6:.2f}M elements)")
        cells = [f"{r['ratio'][n]:.3f} ({r['ratio_range'][n][0]:.2f}–{r['ratio_range'][n][1]:.2f})"
                 for n in names[1:]]
        lines.append(f"| {label} | {r['step_s']['GELU'] * 1e3:.0f} | " + " | ".join(cells) + " |")
    if all("profile" in r for r in results):
        lines += ["", "| model | GELU gates ms/step | λ-GELU gates ms/step | GELU step ms (profiled) "
                      "| gates' extra ÷ step |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in results:
            p = r["profile"]
            extra = (p["λ-GELU compiled gates ms/step"] - p["GELU gates ms/step"]) / p["GELU step ms (profiled)"]
            lines.append(f"| {r['model']} | {p['GELU gates ms/step']:.1f} | {p['λ-GELU compiled gates ms/step']:.1f} | "
                         f"{p['GELU step ms (profiled)']:.0f} | {extra:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from-json", metavar="FILE", help="print the tables of a saved run; measure nothing")
    parser.add_argument("--out", default="runs/train_step_speed.json")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--models", default="vit,gpt")
    parser.add_argument("--repeats", type=int, default=5, help="round-robin steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="ratio: median over rounds of each round's ratio")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also attribute step time to the gates (profiler)")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(f"command: {saved['command']} (torch {saved['torch']}, {saved['threads']} threads, "
              f"{saved['rounds']} rounds × {saved['repeats']} steps after {saved['warmup']} warm-up)")
        print()
        print(tables(saved["results"]))
        return
    out = check_writable(args.out, args.force)
    torch.set_num_threads(args.threads)

    results = []
    for kind in args.models.split(","):
        results.append(measure(kind, args.warmup, args.repeats, args.rounds))
        if args.profile:
            results[-1]["profile"] = gate_profile(kind)
        print(f"measured {kind}", flush=True)

    print()
    print(tables(results))
    report = {
        "command": " ".join(["python", "benchmarks/train_step_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "compile_status": kernels.compile_status(),
        "repeats": args.repeats,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "vit": VIT | {"batch": VIT_BATCH},
        "gpt": GPT | {"batch": GPT_BATCH},
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
