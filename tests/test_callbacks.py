"""Training-framework integrations: TensorBoard helper, Lightning callback, transformers TrainerCallback.

Each runs a tiny real training job and reads back what was logged.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lambda_gelu as lg
from lambda_gelu.calibrate import calibrate
from lambda_gelu.gates import layer_lambdas
from lambda_gelu.integrations.common import HardeningPlan, ScheduledHardening


def read_events(folder: Path):
    """An EventAccumulator over every event file under ``folder`` (one run)."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard is not installed"
    )
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    accumulator = event_accumulator.EventAccumulator(
        str(files[0].parent), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0}
    )
    accumulator.Reload()
    return accumulator


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))
    lg.convert(net)
    return net


def blobs(n: int = 256) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def test_scheduled_hardening_reaches_the_targets_in_a_plain_loop():
    net = mlp()
    data = blobs()
    batches = [data.tensors[0][:64], data.tensors[0][64:128]]
    core = ScheduledHardening(HardeningPlan(start_step=3, ramp_steps=6, retarget_every=0), calibration_data=batches)
    optimizer = torch.optim.AdamW(lg.param_groups(net, lr=1e-2))
    seen = []
    for step in range(12):
        core.before_step(net, step)
        seen.append(layer_lambdas(net))
        x, y = data.tensors[0][step * 16:(step + 1) * 16], data.tensors[1][step * 16:(step + 1) * 16]
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert core.hardener is not None and core.done
    targets = {name: float(value) for name, value in core.hardener.target.items()}
    assert set(targets) == {"1", "3"} and min(targets.values()) > 2.0
    for name, target in targets.items():
        assert math.isclose(layer_lambdas(net)[name], target, rel_tol=1e-5)
        path = [row[name] for row in seen[3:]]
        assert all(b >= a - 1e-9 for a, b in itertools.pairwise(path))  # monotone ramp
    # calibration on (input, target) tuples, or on dicts with a forward, gives the same samples as on bare inputs
    tuples = calibrate(net, [(batches[0], None)])
    dicts = calibrate(net, [{"x": batches[0]}], forward=lambda model, batch: model(batch["x"]))
    plain = lg.calibrate(net, [batches[0]])
    for other in (tuples, dicts):
        assert set(other) == set(plain) and all(torch.equal(other[k], plain[k]) for k in plain)


def test_tensorboard_helper_writes_scalars_and_histograms(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from lambda_gelu.integrations.tensorboard import log_lambdas, log_preactivations, summary_writer

    net = nn.Sequential(nn.Linear(8, 16), lg.LambdaGELU(init=2.5), nn.Linear(16, 4),
                        lg.LambdaGELU(init=[1.5, 3.0, 4.0, 5.0], num_channels=4))
    writer = summary_writer(str(tmp_path))
    samples = lg.calibrate(net, [torch.randn(32, 8)])
    for step in range(3):
        net[1].set_lambda_(2.5 + step)
        assert log_lambdas(writer, net, step) == pytest.approx({"1": 2.5 + step, "3": 3.375})
    log_preactivations(writer, samples, step=2)
    writer.close()
    events = read_events(tmp_path)
    assert [e.value for e in events.Scalars("lambda/1")] == pytest.approx([2.5, 3.5, 4.5])
    assert [e.step for e in events.Scalars("lambda/1")] == [0, 1, 2]
    assert events.Scalars("lambda/3")[0].value == pytest.approx(3.375)
    histogram = events.Histograms("preact/1")[0].histogram_value
    assert histogram.num == samples["1"].numel()
    assert histogram.min == pytest.approx(float(samples["1"].min()))
    assert events.Histograms("lambda_channels/3")[0].histogram_value.num == 4


def test_lightning_callback_logs_and_hardens(tmp_path):
    lightning = pytest.importorskip("lightning", reason="the train extra (lightning) is not installed")
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from lightning.pytorch.loggers import TensorBoardLogger

    from lambda_gelu.integrations.lightning import LambdaGELUCallback

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(lg.param_groups(self, lr=1e-2))

    module = Module()
    callback = LambdaGELUCallback(HardeningPlan(start_step=6, ramp_steps=10, calibration_batches=2, retarget_every=5),
                                  histogram_every=10)
    trainer = lightning.Trainer(
        max_steps=20, accelerator="cpu", logger=TensorBoardLogger(str(tmp_path), name="run"), log_every_n_steps=1,
        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(blobs(), batch_size=32, shuffle=True))
    hardener = callback.hardener
    assert hardener is not None and hardener.done and hardener.step_count == 14  # steps 6..19
    final = layer_lambdas(module)
    for name, target in hardener.target.items():
        assert math.isclose(final[name], float(target), rel_tol=1e-5), name
    events = read_events(tmp_path)
    for layer in ("net.1", "net.3"):
        logged = events.Scalars(f"lambda/{layer}")
        assert len(logged) == 20
        assert logged[-1].value == pytest.approx(final[layer], rel=1e-5)
        assert logged[-1].value > 3 * logged[5].value  # hardening moved λ a long way
    assert {e.step for e in events.Histograms("preact/net.1")} == {10, 20}
    # the swap after hardening barely changes the function: D(λ*) <= τ in every layer
    x = blobs().tensors[0]
    with torch.no_grad():
        before = module(x)
        lg.relufy(module.net)
        after = module(x)
    assert float((after - before).abs().max()) < 0.05 * float(before.abs().max())


class Sentences(Dataset):
    """Random token ids with a label that depends on them (a tiny classification task)."""

    def __init__(self, n: int = 64, length: int = 8) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 40, (n, length), generator=generator)
        self.labels = (self.ids[:, 0] > 20).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "attention_mask": torch.ones_like(self.ids[index]),
                "labels": self.labels[index]}


def test_transformers_trainer_callback_logs_and_hardens(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (hf extra)")
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from lambda_gelu.integrations.hf_trainer import LambdaGELUTrainerCallback

    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    assert len(lg.convert(model)) == 2
    optimizer = torch.optim.AdamW(lg.param_groups(model, lr=1e-3))
    callback = LambdaGELUTrainerCallback(
        HardeningPlan(start_step=2, ramp_steps=8, calibration_batches=2, retarget_every=4),
        tensorboard_dir=str(tmp_path / "tb"), histogram_every=5,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8, logging_steps=2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Sentences(), optimizers=(optimizer, None),
                      callbacks=[callback])
    trainer.train()
    hardener = callback.hardener
    assert hardener is not None and hardener.done and hardener.step_count == 10  # global steps 2..11
    layers = [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]
    final = layer_lambdas(model)
    assert sorted(hardener.target) == layers
    for name in layers:
        assert math.isclose(final[name], float(hardener.target[name]), rel_tol=1e-5)
    logged = [row for row in trainer.state.log_history if "loss" in row]  # the training-loss records
    assert all(f"lambda/{name}" in row for row in logged for name in layers)
    assert [row["step"] for row in logged] == [2, 4, 6, 8, 10, 12]
    assert logged[-1][f"lambda/{layers[1]}"] == pytest.approx(final[layers[1]], rel=1e-5)
    assert logged[-1][f"lambda/{layers[0]}"] > 3 * logged[0][f"lambda/{layers[0]}"]
    events = read_events(tmp_path / "tb")
    assert [e.step for e in events.Scalars(f"lambda/{layers[0]}")] == [2, 4, 6, 8, 10, 12]
    assert {e.step for e in events.Histograms(f"preact/{layers[0]}")} == {5, 10}
    lg.relufy(model)
    assert model.config.hidden_act == "relu"

