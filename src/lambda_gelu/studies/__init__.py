"""The study: model–data pairs, learning dynamics of λ, layerwise hardness profiles, the ReLU-ization table.

Each study is one function that writes a results folder (README.md with the
tables, CSV/JSON, PNG figures, and the seeds, versions and command); the
``lambda-gelu study`` command runs them.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lambda_gelu.studies.common import PAIRS, PROFILES, PairSpec, StudyContext
from lambda_gelu.studies.dynamics import run_dynamics
from lambda_gelu.studies.profiles import run_profiles
from lambda_gelu.studies.relufy import run_relufy

STUDIES: dict[str, Callable[..., dict[str, Any]]] = {
    "relufy": run_relufy,
    "profiles": run_profiles,
    "dynamics": run_dynamics,
}
"""Every study by name, in the order ``all`` runs them: ``run(out, ctx, pairs=None, force=False)``."""


def run_study(name: str, out: str | Path, ctx: StudyContext, pairs: list[str] | None = None,
              force: bool = False) -> dict[str, Any]:
    """Run one study by name.

    ``all`` runs every study, each into ``out/<name>``; without a
    ``ctx.cache_dir`` they share trained models through a temporary cache
    (the profile study's λ0 = 1 runs are the ReLU-ization study's λ-GELU models).
    """
    if name == "all":
        if ctx.cache_dir is not None:
            return {study: run(Path(out) / study, ctx, pairs, force) for study, run in STUDIES.items()}
        with tempfile.TemporaryDirectory(prefix="lambda-gelu-study-cache-") as cache:
            shared = dataclasses.replace(ctx, cache_dir=cache)
            return {study: run(Path(out) / study, shared, pairs, force) for study, run in STUDIES.items()}
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {[*STUDIES, 'all']}")
    return STUDIES[name](out, ctx, pairs, force)


__all__ = ["PAIRS", "PROFILES", "STUDIES", "PairSpec", "StudyContext", "run_study"]
