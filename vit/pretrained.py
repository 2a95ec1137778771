"""Starting from pretrained weights: read a checkpoint, map its names onto vit's, fit it to the model.

Where the weights may come from (``source``):

* a file: timm's ``.pth`` / ``.bin`` / ``.safetensors``, the original JAX ``.npz``, Hugging Face's
  ``ViTForImageClassification`` weights, or this package's own ``.ckpt`` or safetensors export;
* a hub checkpoint folder (``model.safetensors`` or ``pytorch_model.bin``, with ``config.json``);
* ``timm:NAME``: timm's hub, for users with a network (``timm:vit_base_patch16_224.augreg_in21k_ft_in1k``);
* a state dict already in memory.

:func:`load_pretrained` then fits the weights to the model the way fine-tuning needs: position
embeddings resampled to the model's patch grid, the patch projection adapted to another number
of input channels, the classifier head dropped (and left freshly initialised) when the class
count differs. It reports what it did and which keys were missing or unexpected. Reading never
executes code: safetensors, ``torch.load(weights_only=True)`` or ``numpy.load(allow_pickle=False)``.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from vit.errors import CheckpointError
from vit.pos_embed import resample_position_embedding

log = logging.getLogger(__name__)

HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did."""

    source: str
    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the model has no place for
    notes: list[str] = field(default_factory=list)  # each adaptation made (head dropped, grid resampled ...)

    def describe(self) -> str:
        parts = [f"loaded {self.source}"] + self.notes
        if self.missing:
            parts.append(f"missing (left as initialised): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (ignored): {', '.join(self.unexpected)}")
        return "; ".join(parts)


def load_pretrained(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> LoadReport:
    """Load ``source``'s weights into ``model`` (a ``vit.VisionTransformer``), fitted to it.

    Sets ``model.pretrained_cfg`` to the data configuration that goes with the weights (input
    size, mean, std, interpolation, crop) when the source says it. Raises CheckpointError, naming
    the source, for a file that is missing, truncated, unsafe, or not a ViT of this shape.
    """
    name = "a state dict" if isinstance(source, Mapping) else str(source)
    if isinstance(source, Mapping):
        state, data_cfg = dict(source), {}
    else:
        state, data_cfg = read_checkpoint(source)
    state = to_vit_names(state, name)
    state, notes = fit_to_model(state, model, name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    report = LoadReport(name, list(missing), list(unexpected), notes)
    if len(missing) > len(model.state_dict()) // 2:
        raise CheckpointError(f"{name} does not hold the weights of this model: {len(missing)} of its "
                              f"{len(model.state_dict())} tensors are missing (e.g. {', '.join(missing[:4])}); "
                              f"is it a ViT checkpoint?")
    if hasattr(model, "pretrained_cfg"):
        model.pretrained_cfg = {**model.pretrained_cfg, **data_cfg, "source": name}
    log.info("%s", report.describe())
    return report


# -- reading ----------------------------------------------------------------------------------------


def read_checkpoint(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of ``source`` and the data config stored with them (mean, std ...; may be empty)."""
    if isinstance(source, str) and source.startswith("timm:"):
        return _from_timm_hub(source.removeprefix("timm:"))
    path = Path(source)
    if path.is_dir():
        weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise CheckpointError(f"folder {path} holds none of {', '.join(WEIGHT_FILES)}")
        return read_checkpoint(weights)[0], _folder_data_config(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained weights {path} not found (a file, a hub checkpoint folder, or timm:NAME)")
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        if path.suffix == ".npz":
            return _read_jax_npz(path), {}
        return _read_torch(path)
    except CheckpointError:
        raise
    except Exception as error:  # truncated or foreign files fail in many ways; name the file
        raise CheckpointError(f"cannot read pretrained weights from {path}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''} (truncated, or not a "
                              f"checkpoint?)") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata() or {}
    # The package's own export stores its data normalisation as JSON metadata (vit.export).
    data_cfg = {key: json.loads(metadata[key]) for key in ("mean", "std") if key in metadata}
    return state, data_cfg


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "GLOBAL" in str(error):  # torch's weights-only unpickler met a class or function to call
            raise CheckpointError(f"refusing to load {path}: it holds pickled Python objects besides tensors, and "
                                  f"unpickling them could run code; save a plain state dict or safetensors "
                                  f"instead") from None
        raise
    data_cfg: dict[str, Any] = {}
    if isinstance(checkpoint, dict) and "hyper_parameters" in checkpoint:  # a Lightning checkpoint of this package
        hparams = checkpoint["hyper_parameters"]
        data_cfg = {key: list(hparams[key]) for key in ("mean", "std") if hparams.get(key) is not None}
    for key in ("state_dict", "model", "state_dict_ema", "module"):  # the usual wrappings
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return checkpoint, data_cfg


def _read_jax_npz(path: Path) -> dict[str, torch.Tensor]:
    with np.load(path, allow_pickle=False) as arrays:
        return {key: torch.from_numpy(np.asarray(arrays[key], dtype=np.float32)) for key in arrays.files}


def _folder_data_config(folder: Path) -> dict[str, Any]:
    """mean, std, interpolation and crop from a hub folder's config.json (timm's or Hugging Face's)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    source = config.get("pretrained_cfg", config)
    keys = {"mean": ("mean", "image_mean"), "std": ("std", "image_std"), "interpolation": ("interpolation",),
            "crop_pct": ("crop_pct",)}
    return {ours: source[k] for ours, names in keys.items() for k in names if k in source}


def _from_timm_hub(name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import timm

    architecture = name.split(".")[0]
    if architecture not in timm.list_models():
        raise CheckpointError(f"timm has no model {architecture!r} (from init_from=timm:{name}); "
                              f"see timm.list_models('vit_*')")
    hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or f"timm/{name}"
    try:
        _check_hub_reachable(hub_id)
        model = timm.create_model(name, pretrained=True)
    except Exception as error:  # offline, or the hub refused: say what to fetch by hand
        raise CheckpointError(
            f"could not download timm weights {name!r} ({type(error).__name__}). With a network, retry; "
            f"offline, download https://huggingface.co/{hub_id}/resolve/main/model.safetensors on a "
            f"machine that has one, copy it here and pass model.init_from=PATH/TO/model.safetensors") from None
    cfg = model.pretrained_cfg
    data_cfg = {key: cfg[key] for key in ("mean", "std", "interpolation", "crop_pct", "input_size") if key in cfg}
    return model.state_dict(), data_cfg


def _check_hub_reachable(hub_id: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when the weights are not cached and the hub cannot be reached: the hub
    client would otherwise retry for a minute before giving up."""
    import urllib.request

    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "model.safetensors"), str):
        return
    with urllib.request.urlopen(urllib.request.Request("https://huggingface.co", method="HEAD"), timeout=timeout_s):
        pass


# -- naming -----------------------------------------------------------------------------------------


def to_vit_names(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's tensors to vit's (which are timm's), whatever layout it came in."""
    for prefix in ("module.", "model."):  # DDP's and this package's LightningModule's wrappers
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    if any(key.startswith("vit.embeddings.") for key in state):
        return _from_huggingface(state)
    jax_prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in state), None)
    if jax_prefix is not None:
        return _from_jax({key[len(jax_prefix):]: v for key, v in state.items() if key.startswith(jax_prefix)})
    return state


def _from_huggingface(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face's ``ViTForImageClassification``: separate q, k, v; other names."""
    renames = [
        (r"^vit\.embeddings\.cls_token$", "cls_token"),
        (r"^vit\.embeddings\.position_embeddings$", "pos_embed"),
        (r"^vit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^vit\.encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
        (r"^vit\.encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
        (r"^vit\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
        (r"^vit\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
        (r"^vit\.encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
        (r"^vit\.layernorm\.", "norm."),
        (r"^classifier\.", "head."),
    ]
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = re.match(r"^vit\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", key)
        if match:  # W^Q, W^K, W^V stacked in that order are vit's qkv layer
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = value
            continue
        for pattern, replacement in renames:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value
    for (block, kind), parts in qkv.items():
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def _from_jax(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original JAX/Flax ViT ``.npz``: kernels stored (in, out), convolutions (H, W, in, out),
    attention kernels split per head."""
    out = {
        "patch_embed.proj.weight": w["embedding/kernel"].permute(3, 2, 0, 1),
        "patch_embed.proj.bias": w["embedding/bias"],
        "norm.weight": w["Transformer/encoder_norm/scale"],
        "norm.bias": w["Transformer/encoder_norm/bias"],
    }
    if "cls" in w:
        out["cls_token"] = w["cls"]
    if "Transformer/posembed_input/pos_embedding" in w:
        out["pos_embed"] = w["Transformer/posembed_input/pos_embedding"]
    if "head/kernel" in w:
        out["head.weight"], out["head.bias"] = w["head/kernel"].T, w["head/bias"]
    depth = len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})
    for i in range(depth):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attn = b + "MultiHeadDotProductAttention_1/"
        out[t + "norm1.weight"], out[t + "norm1.bias"] = w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"]
        out[t + "norm2.weight"], out[t + "norm2.bias"] = w[b + "LayerNorm_2/scale"], w[b + "LayerNorm_2/bias"]
        # query/key/value kernels are (D, H, Dh): flattened to (D, D), transposed to (out, in), stacked
        out[t + "attn.qkv.weight"] = torch.cat([w[f"{attn}{p}/kernel"].flatten(1).T for p in ("query", "key", "value")])
        out[t + "attn.qkv.bias"] = torch.cat([w[f"{attn}{p}/bias"].flatten() for p in ("query", "key", "value")])
        out[t + "attn.proj.weight"] = w[attn + "out/kernel"].flatten(0, 1).T  # (H, Dh, D) -> (D, D)
        out[t + "attn.proj.bias"] = w[attn + "out/bias"]
        for j, fc in ((0, "fc1"), (1, "fc2")):
            out[t + f"mlp.{fc}.weight"] = w[b + f"MlpBlock_3/Dense_{j}/kernel"].T
            out[t + f"mlp.{fc}.bias"] = w[b + f"MlpBlock_3/Dense_{j}/bias"]
    return out


# -- fitting ----------------------------------------------------------------------------------------


def fit_to_model(state: dict[str, torch.Tensor], model: nn.Module, name: str
                 ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Adapt the tensors whose shapes legitimately differ in fine-tuning; refuse the others."""
    target = model.state_dict()
    notes: list[str] = []
    state = dict(state)
    if "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape:
        state["pos_embed"], note = _fit_position_embedding(state["pos_embed"], model)
        notes.append(note)
    key = "patch_embed.proj.weight"
    if key in state and key in target and state[key].shape[1] != target[key].shape[1]:
        notes.append(f"patch projection adapted from {state[key].shape[1]} to {target[key].shape[1]} input channels")
        state[key] = adapt_input_channels(state[key], target[key].shape[1])
    heads = [k for k in HEAD_KEYS if k in state and (k not in target or state[k].shape != target[k].shape)]
    if heads:
        classes = state[heads[0]].shape[0]
        for k in heads:
            del state[k]
        notes.append(f"classifier head left as initialised ({classes} classes in {name}, "
                     f"{getattr(model, 'num_classes', '?')} in the model)")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
             if k in target and v.shape != target[k].shape]
    if wrong:
        raise CheckpointError(f"{name} was made for another architecture; tensors whose shapes differ from "
                              f"the model's: {'; '.join(wrong[:5])}")
    return state, notes


def _fit_position_embedding(stored: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, str]:
    """(1, prefix' + gh'*gw', D) -> the model's (1, prefix + gh*gw, D): the grid resampled
    bicubically, the prefix tokens' entries kept (or the class token's copied for a new one)."""
    prefix, grid = model.num_prefix_tokens, model.patch_embed.grid_size
    length = stored.shape[1]
    source_prefix = next((p for p in (prefix, 1, 0, 2) if p <= length and _is_square(length - p)), None)
    if source_prefix is None:
        raise CheckpointError(f"cannot read a patch grid off a position embedding of {length} tokens")
    side = int(round((length - source_prefix) ** 0.5))
    resampled = resample_position_embedding(stored, tuple(grid), (side, side), source_prefix)
    prefix_part, grid_part = resampled[:, :source_prefix], resampled[:, source_prefix:]
    if source_prefix >= prefix:
        prefix_part = prefix_part[:, :prefix]
    else:  # e.g. a distillation token the checkpoint did not have: start from the class token's entry
        fill = prefix_part[:, -1:] if source_prefix else torch.zeros_like(grid_part[:, :1])
        prefix_part = torch.cat([prefix_part] + [fill] * (prefix - source_prefix), dim=1)
    return (torch.cat([prefix_part, grid_part], dim=1),
            f"position embeddings resampled from a {side}x{side} grid to {grid[0]}x{grid[1]}")


def _is_square(n: int) -> bool:
    return n > 0 and int(round(n**0.5)) ** 2 == n


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Patch projection (D, C, P, P) for ``in_chans`` input channels: summed over the colours for
    one channel (a grey image is R = G = B), else repeated and rescaled so that the response to a
    uniform input stays the same."""
    source = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // source)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (source / in_chans)
