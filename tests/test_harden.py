"""The one recipe (reluize) on a user's own model and DataLoader; objectives, batch streams, the affine fold."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lambda_gelu as lg
from lambda_gelu.affine_fold import TrackingFold, sole_linear_readers, swap_fold_
from lambda_gelu.batches import default_forward
from lambda_gelu.distill import Objective, Teacher, make_objective
from lambda_gelu.harden import HardenConfig, finish_hardening, reluize, start_hardening
from lambda_gelu.losses import cosine, cross_entropy, kl, kl_divergence, logits, mean_pooled, mse, next_token_logits
from lambda_gelu.train import BatchStream

GEN = torch.Generator().manual_seed(0)
X = torch.randn(512, 6, generator=GEN)
Y = (X[:, 0] + X[:, 1] ** 2 > 1).long()


def gelu_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 2))


def relu_reference(model: nn.Module) -> nn.Sequential:
    """The same weights in an MLP written with ReLU from the start: an independent reference."""
    reference = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    reference.load_state_dict(model.state_dict())
    return reference


QUICK = HardenConfig(steps=30, retarget_every=10, lr=3e-3, calibration_batches=2)


@pytest.mark.parametrize("loss", ["cross-entropy", "kl"])
def test_reluize_a_user_model_on_its_dataloader(loss):
    model = gelu_mlp()
    model.train()
    loader = DataLoader(TensorDataset(X, Y), batch_size=64, shuffle=True)
    result = reluize(model, loader, loss=loss, config=QUICK, progress=False)
    assert result.converted == ["1", "3"] and result.swapped == ["1", "3"]
    assert all(isinstance(model[i], nn.ReLU) for i in (1, 3))
    assert all(m.training for m in model.modules())  # it came in train mode and leaves in train mode
    assert lg.assert_relu(model, X) == []
    assert max(result.discrepancy.values()) <= QUICK.tau * 1.05  # every gate met τ at its λ* before the swap
    assert set(result.targets) == {"1", "3"} and all(float(t.min()) >= 1.0 for t in result.targets.values())
    with torch.no_grad():
        torch.testing.assert_close(model(X), relu_reference(model)(X))
    assert len(result.losses) == QUICK.steps and all(math.isfinite(v) for v in result.losses)


def test_reluize_without_the_swap_stops_with_lambda_at_its_targets():
    model = gelu_mlp().eval()
    result = reluize(model, [(X[i:i + 64], Y[i:i + 64]) for i in range(0, 512, 64)], config=QUICK, swap=False,
                     progress=False)
    assert result.swapped == [] and not any(m.training for m in model.modules())
    for name, target in result.targets.items():
        torch.testing.assert_close(model.get_submodule(name).lam.double(), target, rtol=1e-5, atol=0)


class HandGELU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(0.5 * h * (1 + torch.erf(h / math.sqrt(2))))


def test_reluize_refuses_a_gate_it_cannot_reach_before_anything_changes():
    model = HandGELU()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lg.UnconvertibleGateError, match=r"erf in <root> \(HandGELU\)"):
        reluize(model, [(X[:64], Y[:64])], config=QUICK, progress=False)
    assert isinstance(model.act, nn.GELU)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_per_channel_reluize_gives_one_target_per_channel():
    model = gelu_mlp()
    result = reluize(model, [(X[i:i + 64], Y[i:i + 64]) for i in range(0, 512, 64)], config=QUICK,
                     per_channel=True, progress=False, swap=False)
    assert {name: tuple(t.shape) for name, t in result.targets.items()} == {"1": (32,), "3": (32,)}


# ---------------------------------------------------------------- a transformers model, dict batches


transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def tiny_bert_classifier(**overrides):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, num_labels=3, **overrides)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def token_batches(count: int = 6, rows: int = 8, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, 60, (rows, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[:, length // 2 + int(torch.randint(0, length // 2, (1,), generator=generator)):] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_reluize_a_transformers_classifier_and_compare_with_stock_relu():
    from transformers import BertForSequenceClassification

    model = tiny_bert_classifier().eval()
    batches = token_batches()
    seen_modes = []
    model.bert.embeddings.dropout.register_forward_pre_hook(
        lambda m, _inputs: seen_modes.append(m.training))
    config = HardenConfig(steps=12, retarget_every=3, calibration_batches=2, train_mode=False, lr=1e-3)
    result = reluize(model, batches, output=logits, loss="kl", config=config, progress=False)
    assert len(result.swapped) == 2 and model.config.hidden_act == "relu"
    assert not any(m.training for m in model.modules())
    assert seen_modes and not any(seen_modes)  # dropout stayed off in every pass, re-targets included
    reference = BertForSequenceClassification(copy.deepcopy(model.config)).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(**batches[0]).logits, reference(**batches[0]).logits)
    print("DBG", lg.smooth_gates(model, **batches[0]))
    assert lg.assert_relu(model, **batches[0])  # the pooler's tanh is left, and reported as no gate
    assert result.other_nonlinearities and not any(op.gate for op in result.other_nonlinearities)


def test_retargeting_keeps_a_hugging_face_model_in_eval_mode():
    """The defect of the old wrapper-based calibration: a re-target left the model in train mode (dropout on)."""
    model = tiny_bert_classifier().eval()
    lg.convert(model)
    batches = token_batches(2)
    hardener = start_hardening(model, batches, tau=1e-5, total_steps=4, retarget_every=1, forward=logits)
    for _ in range(4):
        hardener.step()
        assert not any(m.training for m in model.modules())
    model.train()
    model.bert.pooler.eval()  # a mixed model keeps its mix
    finish_hardening(hardener)
    assert model.training and not model.bert.pooler.training and model.bert.encoder.training


# ---------------------------------------------------------------- objectives


def test_builtin_losses_match_their_formulas():
    student, teacher = torch.randn(5, 7, generator=GEN), torch.randn(5, 7, generator=GEN)
    labels = torch.randint(0, 7, (5,), generator=GEN)
    torch.testing.assert_close(cross_entropy(student, (None, labels)), F.cross_entropy(student, labels))
    torch.testing.assert_close(cross_entropy(student, {"labels": labels}), F.cross_entropy(student, labels))
    p = torch.softmax(teacher, -1)
    want_kl = (p * (p.log() - torch.log_softmax(student, -1))).sum(-1).mean()
    torch.testing.assert_close(kl(student, None, teacher), want_kl)
    torch.testing.assert_close(kl_divergence(student, teacher), want_kl)
    want_cos = (1 - (F.normalize(student, dim=-1) * F.normalize(teacher, dim=-1)).sum(-1)).mean()
    torch.testing.assert_close(cosine(student, None, teacher), want_cos)
    torch.testing.assert_close(mse(student, None, teacher), ((student - teacher) ** 2).mean())
    with pytest.raises(ValueError, match="needs labels"):
        cross_entropy(student, student)


def test_pooled_and_token_outputs_respect_the_attention_mask():
    class Hidden(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            hidden = input_ids.float().unsqueeze(-1).expand(-1, -1, 3)
            return {"last_hidden_state": hidden, "logits": hidden}

    batch = {"input_ids": torch.tensor([[1, 2, 9], [4, 5, 6]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    pooled = mean_pooled(Hidden(), batch)
    torch.testing.assert_close(pooled, F.normalize(torch.tensor([[1.5] * 3, [5.0] * 3]), dim=-1))
    tokens = next_token_logits(Hidden(), batch)  # positions that have a real next token: 1, then 4 and 5
    torch.testing.assert_close(tokens[:, 0], torch.tensor([1.0, 4.0, 5.0]))


def test_make_objective_takes_the_teacher_before_anything_changes():
    model = gelu_mlp()
    objective = make_objective(model, "cross-entropy", distill_weight=0.25)
    assert [w for w, _ in objective.terms] == [0.75, 0.25] and isinstance(objective.teacher, Teacher)
    batch = (X[:16], Y[:16])
    with torch.no_grad():
        want = 0.75 * F.cross_entropy(model(X[:16]), Y[:16])  # the KL to an identical teacher is 0
        torch.testing.assert_close(objective(model, batch), want, atol=1e-6, rtol=1e-6)
    assert make_objective(model, "cosine").teacher is not None and make_objective(model).teacher is None
    with pytest.raises(ValueError, match="unknown loss"):
        make_objective(model, "hinge")
    with pytest.raises(ValueError, match="at least one"):
        Objective(logits, ())


# ---------------------------------------------------------------- the batch stream


def test_a_users_shuffling_dataloader_streams_by_the_seed_and_resumes_in_place():
    loader = DataLoader(TensorDataset(torch.arange(20)), batch_size=4, shuffle=True)

    def take(stream: BatchStream, n: int) -> list[list[int]]:
        return [next(stream)[0].tolist() for _ in range(n)]

    first = take(BatchStream.of_batches(loader, seed=3), 12)  # three epochs of five batches, minus three
    assert first == take(BatchStream.of_batches(loader, seed=3), 12)
    assert first != take(BatchStream.of_batches(loader, seed=4), 12)
    assert sorted(i for batch in first[:5] for i in batch) == list(range(20))  # one epoch: the data set, once
    stream = BatchStream.of_batches(loader, seed=3)
    take(stream, 7)
    resumed = BatchStream.of_batches(loader, seed=3)
    resumed.load_state_dict(stream.state_dict())
    assert take(resumed, 5) == first[7:12]
    state = torch.random.get_rng_state()
    take(BatchStream.of_batches(loader, seed=5), 3)
    assert torch.equal(state, torch.random.get_rng_state())  # the user's RNG is left alone


def test_a_one_shot_iterator_is_refused_when_it_runs_out():
    stream = BatchStream.of_batches(iter([torch.zeros(2)] * 2), seed=0)
    next(stream), next(stream)
    with pytest.raises(ValueError, match="not an iterator"):
        next(stream)
    with pytest.raises(ValueError, match="yielded no batch"):
        next(BatchStream.of_batches([], seed=0))


# ---------------------------------------------------------------- swap + affine fold


def test_affine_fold_is_exact_for_the_fit_and_beats_the_plain_swap():
    model = nn.Sequential(nn.Linear(6, 64), nn.GELU(), nn.Linear(64, 3))
    torch.manual_seed(1)
    inputs = torch.randn(1024, 6, generator=GEN) * 0.7
    with torch.no_grad():
        original, pre = model(inputs), model[0](inputs)
    direct = copy.deepcopy(model)
    lg.relufy(direct, include_gelu=True)
    folded = copy.deepcopy(model)
    report = swap_fold_(folded, [inputs], default_forward, example=inputs[:2])
    assert report.folded == {"1": "2"} and report.unfolded == []
    a, b = report.fits["1"]
    # least squares: a·ReLU + b fits GELU better than ReLU itself, channel by channel
    fit = a.float() * pre.clamp(min=0) + b.float()
    assert bool(((F.gelu(pre) - fit) ** 2).mean(0).le(((F.gelu(pre) - pre.clamp(min=0)) ** 2).mean(0) + 1e-7).all())
    with torch.no_grad():
        torch.testing.assert_close(folded(inputs), model[2](fit), atol=1e-5, rtol=1e-5)  # the fold is exact
        assert F.mse_loss(folded(inputs), original) < 0.5 * F.mse_loss(direct(inputs), original)
    assert lg.assert_relu(folded, inputs[:2]) == []


@pytest.mark.parametrize("layout", ["per-layer", "per-channel", "channel dim 1 of 2-D", "channel dim 1 of 3-D"])
def test_tracking_fold_keeps_each_channel_mean_against_a_hand_computed_shift(layout):
    """A change of λ, folded in the forward pass that sees it: the reader's output mean over the batch is what it
    was before the change, and its bias moved by W·E[f(x; λ_old) − f(x; λ_new)], computed here by hand."""
    torch.manual_seed(0)
    channels = None if layout == "per-layer" else 16
    gate = lg.LambdaGELU(init=1.5, num_channels=channels, channel_dim=1 if "dim 1" in layout else -1)
    if layout == "channel dim 1 of 3-D":  # (N, 16 channels, 5): λ along dim 1, the reader reads dim 2
        model = nn.Sequential(nn.Unflatten(1, (16, 5)), gate, nn.Linear(5, 3))
        inputs = torch.randn(300, 80, generator=GEN)
    else:
        model = nn.Sequential(nn.Linear(6, 16), gate, nn.Linear(16, 3))
        inputs = torch.randn(300, 6, generator=GEN)
    with torch.no_grad():
        pre, before = model[0](inputs).double(), model(inputs).double()
    new = torch.tensor(4.0) if channels is None else torch.linspace(2.0, 9.0, 16)
    old_view, new_view = torch.tensor(1.5), new.double() if pre.ndim == 2 else new.double().reshape(16, 1)
    tracking = TrackingFold(model, sole_linear_readers(model, [inputs], default_forward))
    assert set(tracking.readers) == {"1"}
    weight, bias = model[2].weight.detach().double().clone(), model[2].bias.detach().double().clone()
    gate.set_lambda_(new)
    with torch.no_grad():
        after = model(inputs).double()
        again = model(inputs).double()  # λ did not move since: nothing more is folded
    assert tracking.folds == 1
    torch.testing.assert_close(again, after, atol=0, rtol=0)
    # the mean of each of the reader's outputs over the batch (and, for 3-D, over the gate's channels too)
    torch.testing.assert_close(after.flatten(0, -2).mean(0), before.flatten(0, -2).mean(0), atol=1e-5, rtol=0)
    change = (pre * 0.5 * torch.erfc(-old_view * pre / math.sqrt(2))
              - pre * 0.5 * torch.erfc(-new_view * pre / math.sqrt(2)))
    shift = change.reshape(-1, change.shape[-1]).mean(0)  # per input feature of the reader
    torch.testing.assert_close(model[2].weight.detach().double(), weight, atol=0, rtol=0)  # the mean only
    torch.testing.assert_close(model[2].bias.detach().double(), bias + weight @ shift, atol=1e-5, rtol=1e-5)
    tracking.remove()


def test_fold_readers_are_only_exact_ones():
    """A Linear read twice, by two gates, on a non-gate input too, or sharing its weight is not a fold target."""
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.g1, self.g2 = nn.Linear(6, 8), nn.Linear(6, 8), nn.GELU(), nn.GELU()
            self.shared, self.own, self.g3 = nn.Linear(8, 8), nn.Linear(6, 8), nn.GELU()
            self.tied = nn.Linear(8, 8)
            self.tied.weight = self.shared.weight

        def forward(self, x):
            both = self.shared(self.g1(self.a(x))) + self.shared(self.g2(self.b(x)))  # one Linear, two gates
            return both + self.tied(self.g3(self.own(x)))  # a Linear whose weight another module holds

    model = Two()
    assert sole_linear_readers(model, [torch.randn(4, 6)], default_forward) == {}
    plain = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    assert list(sole_linear_readers(plain, [torch.randn(4, 6)], default_forward)) == ["1"]


def test_a_given_teacher_is_the_one_the_loss_compares_with():
    """teacher= replaces the frozen copy (and is used as it is, frozen in place); a teacher nothing would read,
    or the model being hardened itself, is refused before anything changes."""
    config = HardenConfig(steps=6, lr=3e-3, calibration_batches=1)
    batches = [(X[i:i + 64], Y[i:i + 64]) for i in range(0, 256, 64)]
    copied, given = gelu_mlp(), gelu_mlp()
    teacher = gelu_mlp()
    reluize(copied, batches, loss="kl", config=config, progress=False)
    reluize(given, batches, loss="kl", teacher=teacher, config=config, progress=False)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    want, got = copied.state_dict(), given.state_dict()  # the same weights: the same teacher
    assert all(torch.equal(want[k], got[k]) for k in want)
    model = gelu_mlp()
    for kwargs, message in (({"loss": "kl", "teacher": model}, "not the model being hardened"),
                            ({"objective": make_objective(gelu_mlp(), "kl"), "teacher": teacher},
                             "not with objective="),
                            ({"loss": "cross-entropy", "teacher": teacher, "config": dataclasses.replace(
                                config, distill_weight=0.0)}, "compares with none")):
        with pytest.raises(ValueError, match=message):
            reluize(model, batches, **{"config": config, "progress": False, **kwargs})
        assert not any(isinstance(m, lg.LambdaGELU) for m in model.modules())  # nothing changed


def test_reluize_with_fold_proves_relu_and_changes_less_at_the_swap():
    plain, folded = gelu_mlp(), gelu_mlp()
    config = HardenConfig(steps=30, retarget_every=10, lr=3e-3, calibration_batches=2, tau=1e-2)
    loader = DataLoader(TensorDataset(X, Y), batch_size=64)
    reference = [reluize(m, loader, config=c, progress=False, swap=False)
                 for m, c in ((plain, config), (folded, dataclasses.replace(config, fold=True)))]
    assert all(r.swapped == [] for r in reference)
    before = {id(m): m(X).detach() for m in (plain, folded)}
    lg.relufy(plain, example=X[:2])
    swap_fold_(folded, [X[:128], X[128:256]], default_forward, example=X[:2])
    change = {name: F.mse_loss(m(X).detach(), before[id(m)]) for name, m in (("plain", plain), ("fold", folded))}
    assert change["fold"] < change["plain"]
    whole = gelu_mlp()
    result = reluize(whole, loader, config=dataclasses.replace(config, fold=True), progress=False)
    assert result.folds > 0 and not any(hook for gate in (whole[1], whole[3]) for hook in gate._forward_pre_hooks)
    assert result.swapped == ["1", "3"] and lg.assert_relu(whole, X[:2]) == []
    torch.testing.assert_close(whole(X[:5]), relu_reference(whole)(X[:5]), atol=0, rtol=0)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("fold", [False, True])
def test_reluize_on_a_shuffling_dataloader_stopped_by_a_signal_resumes_bitwise(tmp_path, fold):
    import os
    import signal

    from lambda_gelu.checkpoint import CheckpointError
    from lambda_gelu.resume import Checkpointer, TrainingInterrupted

    loader = DataLoader(TensorDataset(X, Y), batch_size=64, shuffle=True)
    config = HardenConfig(steps=24, retarget_every=5, lr=3e-3, calibration_batches=2, fold=fold)
    reference = gelu_mlp()
    reluize(reference, loader, config=config, progress=False)

    model = gelu_mlp()
    calls = {"n": 0}

    def stop_on_the_15th_training_forward(module: nn.Module, _inputs: tuple) -> None:
        if module is model and module.training:
            calls["n"] += 1
            if calls["n"] == 15:
                os.kill(os.getpid(), signal.SIGTERM)

    handle = model.register_forward_pre_hook(stop_on_the_15th_training_forward)
    with pytest.raises(TrainingInterrupted):
        reluize(model, loader, config=config, progress=False, checkpointer=Checkpointer(tmp_path))
    handle.remove()
    # the saved weights hold the folds made so far (or none): the other setting cannot continue them
    with pytest.raises(CheckpointError, match=f"fold={fold}, this run has fold={not fold}"):
        reluize(gelu_mlp(), loader, config=dataclasses.replace(config, fold=not fold), progress=False,
                checkpointer=Checkpointer(tmp_path, resume=True))
    resumed = gelu_mlp()
    result = reluize(resumed, loader, config=config, progress=False,
                     checkpointer=Checkpointer(tmp_path, resume=True))
    assert len(result.losses) == config.steps
    want, got = reference.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
