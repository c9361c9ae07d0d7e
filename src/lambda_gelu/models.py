"""Reference models that take their activation as an argument, and the activation factory.

The zoo: :class:`MLP`, :class:`ResNet` (1-D or 2-D, with BatchNorm), :class:`ViT`
and the character-level :class:`GPT`. Every gate is a module built by
:func:`make_activation` and named so that a hardness profile reads well
(``blocks.0.act``, ``blocks.0.act1``, ``blocks.0.mlp.act``).
"""

from __future__ import annotations

import itertools
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lambda_gelu.module import LambdaGELU, guard_lambda_loads

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "lambda_gelu": LambdaGELU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (see ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """Flatten → [Linear → activation] × len(hidden) → Linear.

    The activations are named ``blocks.<i>.act``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128, 128, 128),
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        widths = [in_features, *hidden]
        self.blocks = nn.ModuleList(
            nn.Sequential(OrderedDict(fc=nn.Linear(w_in, w_out), act=make_activation(activation)))
            for w_in, w_out in itertools.pairwise(widths)
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.flatten(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _conv(dims: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d}[dims]


def _batch_norm(dims: int) -> type[nn.Module]:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]


class BasicBlock(nn.Module):
    """conv3 → BN → act1 → conv3 → BN, plus the shortcut (1×1 conv + BN when the shape changes) → act2."""

    def __init__(self, c_in: int, c_out: int, stride: int, dims: int, activation: str) -> None:
        super().__init__()
        conv, norm = _conv(dims), _batch_norm(dims)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.act1 = make_activation(activation)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet with BatchNorm for 1-D signals (B, L) / (B, C, L) or images (B, C, H, W).

    stem (conv3 with stride ``stem_stride`` → BN → ``stem.act``) → one
    :class:`BasicBlock` per entry of ``widths`` (stride 2 from the second on;
    gates ``blocks.<i>.act1`` and ``blocks.<i>.act2``) → global average pool →
    Linear. ``dims`` = 1 uses Conv1d (a (B, L) input gets a channel dim), 2
    uses Conv2d.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        dims: int = 2,
        widths: Sequence[int] = (16, 32, 64),
        stem_stride: int = 1,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {dims}")
        if not widths:
            raise ValueError("widths must name at least one stage")
        self.dims = dims
        self.stem = nn.Sequential(OrderedDict(
            conv=_conv(dims)(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False),
            bn=_batch_norm(dims)(widths[0]),
            act=make_activation(activation),
        ))
        self.blocks = nn.ModuleList(
            BasicBlock(c_in, c_out, 1 if i == 0 else 2, dims, activation)
            for i, (c_in, c_out) in enumerate(zip([widths[0], *widths[:-1]], widths, strict=True))
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == self.dims + 1:  # no channel dim: (B, L) or (B, H, W)
            x = x.unsqueeze(1)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.flatten(2).mean(-1))


class Attention(nn.Module):
    """Multi-head self-attention (optionally causal) with one fused qkv projection."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (B, h, T, d_h)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x)) with mlp = fc → ``mlp.act`` → proj."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, causal: bool, activation: str) -> None:
        super().__init__()
        hidden = round(mlp_ratio * dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(
            fc=nn.Linear(dim, hidden), act=make_activation(activation), proj=nn.Linear(hidden, dim)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Vision Transformer: patch embedding + class token + learned positions → pre-norm blocks → LN → head.

    Images (B, C, H, W) (or (B, H, W)) are cut into ``patch_size``² patches by a
    strided convolution. The gates are ``blocks.<i>.mlp.act``.
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int = 28,
        patch_size: int = 7,
        in_channels: int = 1,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, causal=False, activation=activation) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(1)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, 0]))


class GPT(nn.Module):
    """Character-level GPT (nanoGPT-style): token + position embeddings → causal pre-norm blocks → LN → head.

    Input (B, T) token ids with T <= ``block_size``; output (B, T, vocab_size)
    logits for the next token. Weights start at N(0, 0.02²), the residual
    projections at N(0, (0.02/√(2·n_layer))²). Unlike nanoGPT the head does not
    share the token embedding's weight (safetensors checkpoints hold no shared
    tensors). The gates are ``blocks.<i>.mlp.act``.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_embed = nn.Embedding(vocab_size, n_embd)
        self.pos_embed = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(
            TransformerBlock(n_embd, n_head, mlp_ratio, causal=True, activation=activation) for _ in range(n_layer)
        )
        self.norm = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        x = self.tok_embed(idx) + self.pos_embed(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "resnet": ResNet, "vit": ViT, "gpt": GPT}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name with keyword arguments.

    The model is first built on the meta device (no memory) and refused with a ValueError if its weights alone
    would not fit in this machine's memory: a typo'd width, or a checkpoint header claiming one, is one line, not
    a failure inside the allocator.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    with torch.device("meta"):
        probe = MODELS[name](**kwargs)
    size = sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
    memory = physical_memory()
    if memory is not None and size > memory:
        count = sum(p.numel() for p in probe.parameters())
        raise ValueError(f"model {name!r} with {kwargs} would hold {count:,} parameters ({size / 2**30:.1f} GiB), "
                         f"more than this machine's memory ({memory / 2**30:.1f} GiB)")
    return guard_lambda_loads(MODELS[name](**kwargs))


def physical_memory() -> int | None:
    """This machine's memory in bytes, where the OS says (else None)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def model_kwargs_for(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    sequence: bool = False,
    hidden: Sequence[int] = (128, 128, 128),
) -> dict[str, object]:
    """Keyword arguments that fit registry model ``name`` to data with one input of ``input_shape``.

    ``sequence`` marks a character-level language-model data set (inputs are
    (T,) token ids, ``num_classes`` is the vocabulary size), which only
    ``gpt`` takes. ``hidden`` is the MLP's widths. Raises ValueError for a
    model that does not fit the data.
    """
    shape = tuple(int(d) for d in input_shape)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name == "gpt" or sequence:
        if not (name == "gpt" and sequence):
            raise ValueError("gpt is the language model: use it with a character-level data set (shakespeare), "
                             "and a classifier (mlp, resnet, vit) with the others")
        return {"vocab_size": num_classes, "block_size": shape[0]}
    if name == "mlp":
        return {"in_features": math.prod(shape), "num_classes": num_classes, "hidden": list(hidden)}
    if name == "resnet":
        if len(shape) not in (1, 2, 3):
            raise ValueError(f"resnet takes (L,), (C, L) or (C, H, W) inputs, got {shape}")
        return {"num_classes": num_classes, "dims": 1 if len(shape) <= 2 else 2,
                "in_channels": 1 if len(shape) == 1 else shape[0]}
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"vit takes square (C, H, W) images, got inputs of shape {shape}")
    patch = next((p for p in (7, 4, 8, 2) if shape[1] % p == 0), None)
    if patch is None:
        raise ValueError(f"vit: no patch size in (7, 4, 8, 2) divides the image size {shape[1]}")
    return {"num_classes": num_classes, "image_size": shape[1], "in_channels": shape[0], "patch_size": patch}
