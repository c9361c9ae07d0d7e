"""The README's first Python example runs as written and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_first_python_example_runs(one_thread):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "lg.reluize(model, loader" in code
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["result"].swapped == ["1"]
    assert isinstance(namespace["model"][1], torch.nn.ReLU)
