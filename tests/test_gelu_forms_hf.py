"""The GELU forms of real transformers families, end to end: find, convert, harden, relufy, compare with ReLU.

One table of cases (PEFT ``TEST_CASES`` style). Every model is built from a small config with seeded random
weights (nothing comes from the hub). Each case has one of three kinds:

* ``convertible``: every gate is a module, so ``lg.convert`` keeps the function, and after hardening and
  ``lg.relufy`` the model equals an independently built ReLU model. That model is the same class built from a
  ReLU config (when the config can say ReLU), with any remaining hard-coded activation replaced by hand.
  ``preflight`` accepts the model exactly when its class rebuilds the relufied model from the relufied config.
* ``refused``: a gate no module swap reaches (a functional call, a run-time ``ACT2FN`` look-up, inline math,
  an unregistered global instance). ``convert`` and ``relufy`` refuse before changing anything and name where
  the gate is.
* ``lookalike``: QuickGELU. ``convert`` refuses it as ``NotGELUError`` even without an example.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

import lambda_gelu as lg  # noqa: E402
from lambda_gelu.runs.hf import HFUsageError, preflight  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
]

VOCAB = 100
LAYERS = 2


def token_batch() -> dict[str, torch.Tensor]:
    """Two sequences of 8 tokens, as a tokenizer gives them (with an all-ones attention mask)."""
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def whisper_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"input_features": torch.randn(2, 8, 32, generator=generator),
            "decoder_input_ids": torch.randint(3, VOCAB, (2, 4), generator=generator)}


def per_layer(template: str) -> tuple[str, ...]:
    return tuple(template.format(i) for i in range(LAYERS))


BERT = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB)


@dataclass(frozen=True)
class Case:
    """One transformers family and what the library must do with it."""

    name: str
    model_cls: str
    config_cls: str
    config: dict[str, Any]
    task: str  # preflight's task
    kind: str  # "convertible", "refused" or "lookalike"
    gate_ops: frozenset[str]  # aten ops of the gates smooth_gates reports before any change
    gate_modules: tuple[str, ...]  # the modules that smooth_gates says run a gate
    inputs: Callable[[], dict[str, torch.Tensor]] = token_batch
    non_gates: tuple[tuple[str, str], ...] = ()  # (module, op) smooth ops that must NOT count as gates
    # convertible
    converted: tuple[str, ...] | None = None  # what convert swaps (default: gate_modules)
    approximate: str = "none"  # form of the LambdaGELU modules convert makes
    relu_config: dict[str, Any] = field(default_factory=dict)  # config overrides that say ReLU (empty: none can)
    hand_relu: str | None = None  # regex of the modules still GELU under relu_config, to set to nn.ReLU by hand
    stock_relu: bool = False  # the class rebuilds the relufied model from the relufied config
    config_fields: tuple[str, ...] = ()  # what preflight reports rewriting (stock_relu cases)
    # refused / lookalike
    unreachable: tuple[tuple[str, str], ...] = ()  # (module, op) of the gates no module swap reaches


TEST_CASES = [
    # ----------------------------------------------------------- convertible: every gate is a module
    Case("bert_gelu", "BertModel", "BertConfig", BERT, "feature-extraction", "convertible",
         frozenset({"gelu"}), per_layer("encoder.layer.{}.intermediate.intermediate_act_fn"),
         non_gates=(("pooler.activation", "tanh"),), relu_config={"hidden_act": "relu"}, stock_relu=True,
         config_fields=("config.hidden_act",)),
    Case("gpt2_gelu_new", "GPT2Model", "GPT2Config",
         dict(n_embd=32, n_layer=LAYERS, n_head=2, n_inner=64, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
              eos_token_id=2),
         "feature-extraction", "convertible", frozenset({"tanh"}), per_layer("h.{}.mlp.act"), approximate="tanh",
         relu_config={"activation_function": "relu"}, stock_relu=True, config_fields=("config.activation_function",)),
    Case("bert_gelu_pytorch_tanh", "BertModel", "BertConfig", dict(BERT, hidden_act="gelu_pytorch_tanh"),
         "feature-extraction", "convertible", frozenset({"gelu"}),
         per_layer("encoder.layer.{}.intermediate.intermediate_act_fn"), non_gates=(("pooler.activation", "tanh"),),
         approximate="tanh", relu_config={"hidden_act": "relu"}, stock_relu=True, config_fields=("config.hidden_act",)),
    Case("bloom_bloomgelu", "BloomForCausalLM", "BloomConfig",
         dict(hidden_size=32, n_layer=LAYERS, n_head=2, vocab_size=VOCAB), "causal-lm", "convertible",
         frozenset({"tanh"}), per_layer("transformer.h.{}.mlp.gelu_impl"),
         non_gates=(("transformer.h.0.self_attention", "_softmax"),), approximate="tanh",
         hand_relu=r"transformer\.h\.\d+\.mlp\.gelu_impl"),
    # XLM: both layers hold transformers.activations.gelu, one global GELUActivation instance; smooth_gates names
    # it once (under its first name, run twice). Its config says ReLU only through the boolean gelu_activation.
    Case("xlm_shared_global", "XLMModel", "XLMConfig",
         dict(emb_dim=32, n_layers=LAYERS, n_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
         "feature-extraction", "convertible", frozenset({"gelu"}), ("ffns.0.act",),
         non_gates=(("attentions.0", "_softmax"),), converted=per_layer("ffns.{}.act"),
         relu_config={"gelu_activation": False}),
    Case("mpt_nn_gelu", "MptForCausalLM", "MptConfig",
         dict(d_model=32, n_layers=LAYERS, n_heads=2, vocab_size=VOCAB, max_seq_len=64, expansion_ratio=2),
         "causal-lm", "convertible", frozenset({"gelu"}), per_layer("transformer.blocks.{}.ffn.act"),
         hand_relu=r"transformer\.blocks\.\d+\.ffn\.act"),
    # Electra's classification head is get_activation("gelu"), whatever the config says: fine in memory,
    # but no stock ReLU model.
    Case("electra_cls_hardcoded_head", "ElectraForSequenceClassification", "ElectraConfig",
         dict(BERT, embedding_size=32), "sequence-classification", "convertible", frozenset({"gelu"}),
         (*per_layer("electra.encoder.layer.{}.intermediate.intermediate_act_fn"), "classifier.activation"),
         relu_config={"hidden_act": "relu", "summary_activation": "relu"}, hand_relu=r"classifier\.activation"),
    # ----------------------------------------------------------- refused: a gate no module swap reaches
    Case("whisper_functional_conv_stem", "WhisperModel", "WhisperConfig",
         dict(d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=2,
              decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, num_mel_bins=8,
              max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              decoder_start_token_id=1),
         "feature-extraction", "refused", frozenset({"gelu"}),
         ("encoder", *per_layer("encoder.layers.{}.activation_fn"), *per_layer("decoder.layers.{}.activation_fn")),
         inputs=whisper_batch, unreachable=(("encoder", "gelu"),)),
    Case("deberta_v2_cls_runtime_lookup", "DebertaV2ForSequenceClassification", "DebertaV2Config", BERT,
         "sequence-classification", "refused", frozenset({"gelu"}),
         (*per_layer("deberta.encoder.layer.{}.intermediate.intermediate_act_fn"), "pooler"),
         unreachable=(("pooler", "gelu"),)),
    Case("esm_inline_erf", "EsmModel", "EsmConfig",
         dict(BERT, pad_token_id=1, max_position_embeddings=64, position_embedding_type="absolute"),
         "feature-extraction", "refused", frozenset({"erf"}), per_layer("encoder.layer.{}.intermediate"),
         non_gates=(("pooler.activation", "tanh"),),
         unreachable=tuple((m, "erf") for m in per_layer("encoder.layer.{}.intermediate"))),
    Case("roberta_mlm_global_instance", "RobertaForMaskedLM", "RobertaConfig",
         dict(BERT, pad_token_id=1, max_position_embeddings=64), "masked-lm", "refused", frozenset({"gelu"}),
         (*per_layer("roberta.encoder.layer.{}.intermediate.intermediate_act_fn"), "lm_head"),
         unreachable=(("lm_head", "gelu"),)),
    # ----------------------------------------------------------- look-alike
    Case("clip_text_quick_gelu", "CLIPTextModel", "CLIPTextConfig",
         dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, vocab_size=VOCAB,
              max_position_embeddings=16),
         "feature-extraction", "lookalike", frozenset({"sigmoid"}), per_layer("encoder.layers.{}.mlp.activation_fn"),
         unreachable=tuple((m, "sigmoid") for m in per_layer("encoder.layers.{}.mlp.activation_fn"))),
]

CASES = {case.name: case for case in TEST_CASES}


def cases(*kinds: str, xfail: dict[str, str] | None = None) -> list[Any]:
    """pytest params of the cases of ``kinds``; ``xfail`` maps a case name to the reason it is a known bug."""
    xfail = xfail or {}
    return [pytest.param(case, id=case.name,
                         marks=[pytest.mark.xfail(strict=True, reason=xfail[case.name])] if case.name in xfail else [])
            for case in TEST_CASES if case.kind in kinds]


# ---------------------------------------------------------------------------------------------- helpers


def make_config(case: Case, **overrides: Any) -> Any:
    return getattr(transformers, case.config_cls)(**{**case.config, **overrides})


def build(case: Case, **config_overrides: Any) -> nn.Module:
    """A fresh model of ``case`` (seeded random weights), in eval mode."""
    config = make_config(case, **config_overrides)
    torch.manual_seed(0)
    return getattr(transformers, case.model_cls)(config).eval()


@functools.cache
def _built(name: str) -> nn.Module:
    return build(CASES[name])


def original(case: Case) -> nn.Module:
    """A private copy of the case's model (built once per process)."""
    return copy.deepcopy(_built(case.name))


def output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def gates_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[lg.SmoothOp]:
    return [op for op in lg.smooth_gates(model, **batch) if op.gate]


def scale_of(t: torch.Tensor) -> float:
    return float(t.abs().max()) or 1.0


def hand_relu(model: nn.Module, pattern: str) -> list[str]:
    """Replace, by plain setattr, every submodule whose qualified name fully matches ``pattern`` by nn.ReLU."""
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if re.fullmatch(pattern, name)]
    assert names, f"no module of {type(model).__name__} matches {pattern!r}"
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.ReLU())
    return names


def reference_relu(case: Case, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The ReLU model built without lambda-gelu: the class from a ReLU config, hard-coded gates set by hand,
    then ``state_dict`` loaded strictly."""
    reference = build(case, **case.relu_config)
    if case.hand_relu is not None:
        hand_relu(reference, case.hand_relu)
    reference.load_state_dict(state_dict, strict=True)
    return reference.eval()


def snapshot(model: nn.Module) -> tuple[list, dict[str, torch.Tensor], dict[str, Any]]:
    modules = [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return modules, state, model.config.to_dict()


def assert_unchanged(model: nn.Module, before: tuple[list, dict[str, torch.Tensor], dict[str, Any]]) -> None:
    modules, state, config = before
    assert [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), f"{key} changed"
    assert model.config.to_dict() == config
    assert not any(isinstance(m, (lg.LambdaGELU, nn.ReLU)) for m in model.modules())


def hardened_and_relufied(case: Case) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """(original, its converted → λ = 1e5 → relufied copy, the batch)."""
    batch = case.inputs()
    model = original(case)
    relu = copy.deepcopy(model)
    lg.convert(relu, example=batch)
    for m in relu.modules():
        if isinstance(m, lg.LambdaGELU):
            m.set_lambda_(1e5)
    lg.relufy(relu, example=batch)
    return model, relu, batch


# ---------------------------------------------------------------------------------------------- what runs


@pytest.mark.parametrize("case", cases("convertible", "refused", "lookalike"))
def test_smooth_gates_finds_every_gate_form(case):
    model = original(case)
    batch = case.inputs()
    found = lg.smooth_gates(model, **batch)
    gates = [op for op in found if op.gate]
    assert {op.module for op in gates} == set(case.gate_modules)
    assert {op.op for op in gates} == case.gate_ops
    for module, op in case.non_gates:
        assert any(o.module == module and o.op == op and not o.gate for o in found), (module, op, found)
    with pytest.raises(lg.SmoothGateError) as raised:
        lg.assert_relu(model, **batch)
    assert {op.module for op in raised.value.gates} == set(case.gate_modules)


# ---------------------------------------------------------------------------------------------- convertible


@pytest.mark.parametrize("case", cases("convertible"))
def test_convert_keeps_the_function(case):
    model = original(case)
    batch = case.inputs()
    want = output(model, batch)
    converted = copy.deepcopy(model)
    changed = lg.convert(converted, example=batch)
    assert changed == list(case.converted or case.gate_modules)
    layers = {name: converted.get_submodule(name) for name in changed}
    assert all(isinstance(m, lg.LambdaGELU) for m in layers.values())
    assert {m.approximate for m in layers.values()} == {case.approximate}
    gates = gates_of(converted, batch)
    assert gates and all(op.op.startswith("lambda_gelu") for op in gates), gates
    assert sum(op.calls for op in gates) == len(changed)  # every swapped gate runs, once per forward
    got = output(converted, batch)
    scale = scale_of(want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("case", cases("convertible"))
def test_hardened_relufied_model_equals_an_independent_relu_model(case):
    model, relu, batch = hardened_and_relufied(case)
    assert lg.assert_relu(relu, **batch) is not None  # no smooth gate runs in memory
    assert not any(isinstance(m, lg.LambdaGELU) for m in relu.modules())
    for name in case.converted or case.gate_modules:
        assert isinstance(relu.get_submodule(name), nn.ReLU), name
    # relufy changed gates only: the weights are the original's, key for key
    original_state, relu_state = model.state_dict(), relu.state_dict()
    assert list(relu_state) == list(original_state)
    for key, value in original_state.items():
        assert torch.equal(relu_state[key], value), key

    reference = reference_relu(case, relu_state)
    lg.assert_relu(reference, **batch)  # the reference itself is a ReLU model
    want = output(reference, batch)
    got = output(relu, batch)
    torch.testing.assert_close(got, want)
    gelu_out = output(model, batch)
    scale = scale_of(want)
    assert float((gelu_out - want).abs().max()) > 1e-3 * scale, "GELU and ReLU models agree: the check is vacuous"


@pytest.mark.parametrize("case", cases("convertible"))
def test_lambda_1e5_is_already_relu_to_tolerance(case):
    """Before the swap, λ-GELU at λ = 1e5 computes what the ReLU reference computes, to ~1e-5 of the output."""
    batch = case.inputs()
    model = original(case)
    lg.convert(model, example=batch)
    for m in model.modules():
        if isinstance(m, lg.LambdaGELU):
            m.set_lambda_(1e5)
    reference = reference_relu(case, {k: v for k, v in model.state_dict().items() if "log_lam" not in k})
    want = output(reference, batch)
    torch.testing.assert_close(output(model, batch), want, rtol=1e-4, atol=1e-4 * scale_of(want))


@pytest.mark.parametrize("case", cases("convertible"))
def test_config_alone_expresses_relu_only_where_nothing_is_hard_coded(case):
    """The class built from the ReLU config still runs a smooth gate exactly at the hand-patched modules."""
    batch = case.inputs()
    config_only = build(case, **case.relu_config)
    hard_coded = set() if case.hand_relu is None else {
        name for name, _ in config_only.named_modules() if re.fullmatch(case.hand_relu, name)}
    assert {op.module for op in gates_of(config_only, batch)} == hard_coded


@pytest.mark.parametrize("case", cases("convertible"))
def test_preflight_accepts_exactly_what_the_relufied_config_rebuilds(case):
    """preflight's verdict agrees with a real rebuild: the class built from the relufied model's own config,
    with its weights, either is that ReLU model (a stock ReLU checkpoint) or still runs a smooth gate."""
    model, relu, batch = hardened_and_relufied(case)
    torch.manual_seed(0)
    rebuilt = type(relu)(copy.deepcopy(relu.config)).eval()
    rebuilt.load_state_dict(relu.state_dict(), strict=True)
    still = gates_of(rebuilt, batch)
    assert (not still) == case.stock_relu, still
    if case.stock_relu:
        torch.testing.assert_close(output(rebuilt, batch), output(relu, batch))
        report = preflight(model, case.task, batch)
        assert report["gates"] == list(case.gate_modules)
        assert report["config_fields"] == list(case.config_fields)
        for path in case.config_fields:
            assert getattr(relu.config, path.split(".")[-1]) == "relu", path
    else:
        with pytest.raises(HFUsageError, match=r"cannot be saved as a stock ReLU model.*hard-coded") as raised:
            preflight(model, case.task, batch)
        for op in still[:3]:  # the message names the gates the rebuilt class computes
            assert op.module in str(raised.value), (op, str(raised.value))
    assert lg.smooth_gates(model, **batch)  # preflight left the original GELU model as it was
    assert not any(isinstance(m, (lg.LambdaGELU, nn.ReLU)) for m in model.modules() if m is not model)


def test_electra_hard_coded_head_is_relu_in_memory_but_refused_by_preflight():
    case = CASES["electra_cls_hardcoded_head"]
    model, relu, batch = hardened_and_relufied(case)
    assert lg.assert_relu(relu, **batch) == []
    assert isinstance(relu.classifier.activation, nn.ReLU)
    assert relu.config.hidden_act == "relu"  # relufy rewrote the config; the head does not read it
    with pytest.raises(HFUsageError, match=r"hard-coded") as raised:
        preflight(model, case.task, batch)
    assert "classifier.activation" in str(raised.value)
    assert "electra.encoder" not in str(raised.value)  # the body's gates are set by the config


def test_xlm_shared_global_instance_is_swapped_in_this_model_only():
    case = CASES["xlm_shared_global"]
    batch = case.inputs()
    shared = transformers.activations.gelu
    model = build(case)
    assert model.ffns[0].act is model.ffns[1].act is shared  # the form under test: one global instance
    other = build(case)
    other_out = output(other, batch)
    changed = lg.convert(model, example=batch)
    assert changed == list(case.converted)
    assert model.ffns[0].act is model.ffns[1].act  # shared stays shared
    assert isinstance(model.ffns[0].act, lg.LambdaGELU)
    lg.relufy(model, example=batch)
    assert isinstance(model.ffns[0].act, nn.ReLU) and model.ffns[0].act is model.ffns[1].act
    # the process-wide instance, and every other model holding it, still compute GELU
    assert transformers.activations.gelu is shared and type(shared).__name__ == "GELUActivation"
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(shared(x), F.gelu(x))
    assert other.ffns[0].act is shared and other.ffns[1].act is shared
    assert {op.op for op in gates_of(other, batch)} == {"gelu"}
    torch.testing.assert_close(output(other, batch), other_out, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- refused


@pytest.mark.parametrize("case", cases("refused"))
def test_convert_refuses_an_unreachable_gate_and_names_it(case):
    model = original(case)
    batch = case.inputs()
    before, want = snapshot(model), output(model, batch)
    with pytest.raises(lg.UnconvertibleGateError) as raised:
        lg.convert(model, example=batch)
    assert isinstance(raised.value, lg.SmoothGateError)
    assert sorted((op.module, op.op) for op in raised.value.gates) == sorted(case.unreachable)
    for module, _op in case.unreachable:
        assert module in str(raised.value)
    assert_unchanged(model, before)
    torch.testing.assert_close(output(model, batch), want, rtol=0, atol=0)


@pytest.mark.parametrize("case", cases("refused", "lookalike"))
def test_relufy_include_gelu_refuses_and_leaves_the_model(case):
    model = original(case)
    batch = case.inputs()
    before, want = snapshot(model), output(model, batch)
    with pytest.raises(lg.UnconvertibleGateError) as raised:
        lg.relufy(model, include_gelu=True, example=batch)
    assert sorted((op.module, op.op) for op in raised.value.gates) == sorted(case.unreachable)
    for module, _op in case.unreachable:
        assert module in str(raised.value)
    assert_unchanged(model, before)
    torch.testing.assert_close(output(model, batch), want, rtol=0, atol=0)


@pytest.mark.parametrize("case", cases("lookalike"))
@pytest.mark.parametrize("with_example", [False, True], ids=["no-example", "example"])
def test_convert_refuses_a_lookalike(case, with_example):
    model = original(case)
    batch = case.inputs()
    before, want = snapshot(model), output(model, batch)
    with pytest.raises(lg.NotGELUError) as raised:
        lg.convert(model, example=batch if with_example else None)
    for module, _op in case.unreachable:
        assert module in str(raised.value)
    assert_unchanged(model, before)
    torch.testing.assert_close(output(model, batch), want, rtol=0, atol=0)


@pytest.mark.parametrize("case", cases("refused"))
def test_preflight_names_the_unreachable_gate(case):
    model = original(case)
    batch = case.inputs()
    before = snapshot(model)
    with pytest.raises(HFUsageError, match="no module swap reaches") as raised:
        preflight(model, case.task, batch)
    for module, _op in case.unreachable:
        assert module in str(raised.value)
    assert_unchanged(model, before)


def test_preflight_refuses_a_lookalike_model():
    case = CASES["clip_text_quick_gelu"]
    model = original(case)
    before = snapshot(model)
    with pytest.raises(HFUsageError):
        preflight(model, case.task, case.inputs())
    assert_unchanged(model, before)


def test_deberta_refusal_comes_before_any_config_change():
    """DeBERTa's pooler looks ACT2FN[config.pooler_hidden_act] up in every forward: a config rewrite alone would
    silently change the function. The refusals leave the config (and so the function) exactly as it was."""
    case = CASES["deberta_v2_cls_runtime_lookup"]
    model = original(case)
    batch = case.inputs()
    want = output(model, batch)
    rewritten = copy.deepcopy(model)
    rewritten.config.pooler_hidden_act = "relu"
    assert not torch.allclose(output(rewritten, batch), want), "a config rewrite must be visible in the output"
    for attempt in (lambda: lg.convert(model, example=batch),
                    lambda: lg.relufy(model, include_gelu=True, example=batch)):
        with pytest.raises(lg.UnconvertibleGateError, match="pooler"):
            attempt()
        assert model.config.pooler_hidden_act == "gelu"
        assert model.config.hidden_act == "gelu"
        torch.testing.assert_close(output(model, batch), want, rtol=0, atol=0)
    with pytest.raises(HFUsageError, match="pooler"):
        preflight(model, case.task, batch)
    assert model.config.pooler_hidden_act == "gelu"


# ---------------------------------------------------------------------------------------------- probe batches


def test_causal_lm_preflight_without_attention_mask():
    case = CASES["bloom_bloomgelu"]
    with pytest.raises(HFUsageError, match="hard-coded"):
        preflight(original(case), case.task, {"input_ids": case.inputs()["input_ids"]})
