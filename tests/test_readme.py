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


def test_the_two_recipes_example_runs_on_the_first_examples_model(one_thread):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    both = next(code for code in blocks if "lg.swap_and_train(relu_b" in code)
    torch.manual_seed(0)
    namespace: dict = {}
    setup = blocks[0].split("result = lg.reluize")[0]  # the first example's GELU model and its data
    exec(compile(setup, str(README), "exec"), namespace)
    exec(compile(both, str(README), "exec"), namespace)
    x = namespace["x"]
    for name in ("relu_a", "relu_b"):
        relu = namespace[name]
        assert isinstance(relu[1], torch.nn.ReLU) and namespace["lg"].assert_relu(relu, x[:8]) == []
    assert isinstance(namespace["model"][1], torch.nn.GELU)  # both worked on copies
    kls = [namespace["lg"].disruption(namespace["model"], m, namespace["held_out"]).kl
           for m in (namespace["relu_a"], namespace["relu_b"])]
    assert namespace["relu"] is (namespace["relu_a"], namespace["relu_b"])[kls.index(min(kls))]
