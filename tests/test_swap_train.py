"""The swap-first recipe (swap_and_train): the fold against a hand-computed fit, training, resume, refusals."""

from __future__ import annotations

import copy
import dataclasses
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lambda_gelu as lg
from lambda_gelu.checkpoint import CheckpointError
from lambda_gelu.distill import make_objective
from lambda_gelu.harden import HardenConfig
from lambda_gelu.resume import Checkpointer, TrainingInterrupted
from lambda_gelu.train import BatchStream, train_loop

GEN = torch.Generator().manual_seed(3)
X = torch.randn(512, 6, generator=GEN)
Y = (X[:, 0] - X[:, 2] ** 2 > -0.5).long()
CONFIG = HardenConfig(steps=20, lr=3e-3, calibration_batches=2, fold=True)


def gelu_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 2))


def hand_folded_relu(model: nn.Sequential, calibration: torch.Tensor) -> nn.Sequential:
    """The swap + fold written out: per channel, the least-squares a·ReLU(x) + b ≈ GELU(x) on the GELU model's own
    pre-activations, folded into the next Linear (W ← W·diag(a), β ← β + W·b), then ReLU in an MLP built anew."""
    relu = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    relu.load_state_dict(model.state_dict())
    with torch.no_grad():
        first = model[0](calibration).double()
        second = model[2](F.gelu(model[0](calibration))).double()
        for pre, reader in ((first, relu[2]), (second, relu[4])):
            h, g = pre.clamp(min=0), F.gelu(pre)
            a = ((h - h.mean(0)) * (g - g.mean(0))).mean(0) / h.var(0, unbiased=False)
            b = g.mean(0) - a * h.mean(0)
            weight = reader.weight.double()
            reader.bias.copy_(reader.bias.double() + weight @ b)
            reader.weight.copy_(weight * a)
    return relu


def test_swap_and_train_folds_the_hand_computed_fit_then_trains_as_the_train_loop_does():
    loader = DataLoader(TensorDataset(X, Y), batch_size=64)  # not shuffled: calibration = the first 128 rows
    original = gelu_mlp()
    model = copy.deepcopy(original)
    result = lg.swap_and_train(model, loader, loss="kl", config=CONFIG, progress=False)
    assert result.swapped == ["1", "3"] and result.folded == {"1": "2", "3": "4"} and result.unfolded == []
    assert all(isinstance(model[i], nn.ReLU) for i in (1, 3)) and lg.assert_relu(model, X[:2]) == []
    assert result.other_nonlinearities == [] and len(result.losses) == CONFIG.steps

    reference = hand_folded_relu(original, X[:128])
    with torch.no_grad():  # the fold alone keeps the output closer to GELU's than the plain swap does
        plain = copy.deepcopy(original)
        lg.relufy(plain, include_gelu=True)
        assert F.mse_loss(reference(X), original(X)) < 0.5 * F.mse_loss(plain(X), original(X))
    train_loop(reference, BatchStream.of_batches(loader, CONFIG.seed), make_objective(original, "kl"),
               CONFIG.train_config(), progress=False)
    want, got = reference.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert F.kl_div(F.log_softmax(model(X), -1), F.log_softmax(original(X), -1), log_target=True,
                        reduction="batchmean") < F.kl_div(F.log_softmax(plain(X), -1),
                                                          F.log_softmax(original(X), -1), log_target=True,
                                                          reduction="batchmean")


def test_swap_and_train_without_fold_is_the_plain_swap_then_training():
    loader = DataLoader(TensorDataset(X, Y), batch_size=64)
    config = dataclasses.replace(CONFIG, fold=False, distill_weight=0.5)
    original = gelu_mlp()
    model = copy.deepcopy(original)
    result = lg.swap_and_train(model, loader, config=config, progress=False)
    assert result.folded == {} and result.swapped == ["1", "3"]
    reference = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    reference.load_state_dict(original.state_dict())
    train_loop(reference, BatchStream.of_batches(loader, config.seed),
               make_objective(original, "cross-entropy", distill_weight=0.5), config.train_config(), progress=False)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-5, rtol=1e-5)


def _stopped_at_step_12(model: nn.Module, loader: DataLoader, config: HardenConfig, folder) -> None:
    calls = {"n": 0}

    def stop_on_the_12th_training_forward(module: nn.Module, _inputs: tuple) -> None:
        if module is model and module.training:
            calls["n"] += 1
            if calls["n"] == 12:
                os.kill(os.getpid(), signal.SIGTERM)

    handle = model.register_forward_pre_hook(stop_on_the_12th_training_forward)
    with pytest.raises(TrainingInterrupted):
        lg.swap_and_train(model, loader, config=config, progress=False, checkpointer=Checkpointer(folder))
    handle.remove()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    want, got = a.state_dict(), b.state_dict()
    return want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_swap_and_train_stopped_by_a_signal_resumes_bitwise_and_refuses_other_runs(tmp_path):
    loader = DataLoader(TensorDataset(X, Y), batch_size=64, shuffle=True)
    reference = gelu_mlp()
    lg.swap_and_train(reference, loader, config=CONFIG, progress=False)
    _stopped_at_step_12(gelu_mlp(), loader, CONFIG, tmp_path)
    with pytest.raises(CheckpointError, match="without a Hardener"):  # a swap run cannot continue a hardening
        lg.reluize(gelu_mlp(), loader, config=CONFIG, progress=False,
                   checkpointer=Checkpointer(tmp_path, resume=True))
    with pytest.raises(CheckpointError, match="fold=True, this run has fold=False"):  # its weights hold the fold
        lg.swap_and_train(gelu_mlp(), loader, config=dataclasses.replace(CONFIG, fold=False), progress=False,
                          checkpointer=Checkpointer(tmp_path, resume=True))
    resumed = gelu_mlp()
    result = lg.swap_and_train(resumed, loader, config=CONFIG, progress=False,
                               checkpointer=Checkpointer(tmp_path, resume=True))
    assert len(result.losses) == CONFIG.steps and _same_weights(reference, resumed)


def test_a_state_saved_before_the_fold_setting_resumes_as_unfolded(tmp_path):
    from lambda_gelu.resume import load_state, save_state

    loader = DataLoader(TensorDataset(X, Y), batch_size=64, shuffle=True)
    plain = dataclasses.replace(CONFIG, fold=False)
    reference = gelu_mlp()
    lg.swap_and_train(reference, loader, config=plain, progress=False)
    _stopped_at_step_12(gelu_mlp(), loader, plain, tmp_path)
    (state,) = tmp_path.glob("state-*.safetensors")
    saved = load_state(state)
    saved.body["settings"] = {}  # as saved by 0.2.0.dev0 before the fold setting
    save_state(state, saved.step, saved.body, saved.meta)
    with pytest.raises(CheckpointError, match="fold=False, this run has fold=True"):
        lg.swap_and_train(gelu_mlp(), loader, config=CONFIG, progress=False,
                          checkpointer=Checkpointer(tmp_path, resume=True))
    resumed = gelu_mlp()
    lg.swap_and_train(resumed, loader, config=plain, progress=False, checkpointer=Checkpointer(tmp_path, resume=True))
    assert _same_weights(reference, resumed)


def test_swap_and_train_trains_in_the_mode_its_config_asks_and_gives_the_model_back_in_its_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, 2))
    model.train()
    seen = []
    model[2].register_forward_pre_hook(lambda module, _inputs: seen.append(module.training))
    lg.swap_and_train(model, [(X[:64], Y[:64])], loss="kl", config=dataclasses.replace(CONFIG, train_mode=False),
                      progress=False)
    assert seen and not any(seen)  # dropout off in every pass: the calibration, the proof and each training step
    assert all(m.training for m in model.modules())


def test_swap_and_train_refuses_before_anything_changes():
    model = gelu_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="re-iterable"):
        lg.swap_and_train(model, iter([(X, Y)]), config=CONFIG, progress=False)
    with pytest.raises(ValueError, match="not the model being hardened"):
        lg.swap_and_train(model, [(X, Y)], loss="kl", teacher=model, config=CONFIG, progress=False)
    assert isinstance(model[1], nn.GELU) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class HiddenGate(nn.Module):
    """A GELU module read by a Linear, and after it a gate written as a call no module swap reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.b(self.act(self.a(x))))


def test_swap_and_train_refuses_a_gate_no_swap_reaches_before_it_folds_anything():
    model = HiddenGate()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lg.UnconvertibleGateError, match="gelu"):
        lg.swap_and_train(model, [(X[:64], Y[:64])], config=CONFIG, progress=False)
    assert isinstance(model.act, nn.GELU) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
