"""What a Vision Transformer looks at: class-token attention per head, attention rollout, figures.

Inputs are the per-layer attention probabilities of
:meth:`vit.model.VisionTransformer.get_attention_maps`: a list of ``depth`` tensors of shape
``(B, heads, T, T)`` with ``T = 1 + gh * gw`` (class token first, then the patches row by row).
Row ``i`` of a map is the distribution over keys that token ``i`` reads from, so row 0 is what
the class token, the one the classifier reads, attends to.

* :func:`cls_attention_grid`: one layer's class-token row of every head, laid out as the patch
  grid, ``(B, heads, gh, gw)``. Heads of one layer usually differ a lot: some look at the digit's
  strokes, some at the background, some almost uniformly.
* :func:`attention_rollout` (Abnar & Zuidema, 2020, "Quantifying Attention Flow in
  Transformers"): follows attention through the residual connections of all layers, which a
  single layer's map ignores, to estimate how much each input patch reaches each output token.
* :func:`render_attention_figure`: both of the above over the image, one PNG per image;
  :func:`write_attention_figures` does it for image files and a checkpoint (``visualize.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from vit.lightning_module import ImageClassifier

HeadFusion = Literal["mean", "max", "min"]


def _check_maps(maps: Sequence[torch.Tensor]) -> None:
    if len(maps) == 0:
        raise ValueError("need the attention maps of at least one layer")
    shape = maps[0].shape
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise ValueError(f"attention maps must be (B, heads, T, T), got {tuple(shape)}")
    for i, attn in enumerate(maps):
        if attn.shape != shape:
            raise ValueError(f"attention map of layer {i} has shape {tuple(attn.shape)}, "
                             f"layer 0 has {tuple(shape)}; all layers must agree")


def fuse_heads(attn: torch.Tensor, head_fusion: HeadFusion = "mean") -> torch.Tensor:
    """One layer's attention ``(B, heads, T, T)`` -> ``(B, T, T)``: mean, max or min over heads."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def attention_rollout(maps: Sequence[torch.Tensor], head_fusion: HeadFusion = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout over all layers (Abnar & Zuidema, 2020).

    Each block computes ``x_l = x_{l-1} + Attn_l(x_{l-1})`` (plus an MLP that mixes no tokens),
    so the token mixing of block ``l`` is modelled as attention plus identity::

        Ā_l = rownorm(fuse_heads(A_l) + I)          (B, T, T), rows sum to 1
        R   = Ā_L · Ā_{L-1} · ... · Ā_1             (B, T, T)

    ``R[b, i, j]`` estimates how much input token ``j`` contributes to output token ``i`` after
    the last layer; ``R[:, 0, 1:]`` is the rollout of the class token over the patches.

    Args:
        maps: per-layer attention probabilities, first layer first, each ``(B, heads, T, T)``.
        head_fusion: how the heads of a layer are combined: ``'mean'`` (the paper's),
            ``'max'`` or ``'min'``.
        discard_ratio: in ``[0, 1)``; the smallest ``discard_ratio`` fraction of each row's
            fused weights is set to zero before the identity is added (a common denoising of
            the rollout; 0 keeps the paper's definition). Adding ``I`` afterwards keeps every
            row's sum positive.

    Returns:
        ``(B, T, T)`` in float32, every row summing to one.
    """
    _check_maps(maps)
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    batch, _, tokens, _ = maps[0].shape
    identity = torch.eye(tokens, device=maps[0].device)
    rollout = identity.expand(batch, tokens, tokens)
    n_discard = int(discard_ratio * tokens)
    for attn in maps:
        # float32: a product of tens of bf16 matrices loses the small weights entirely
        fused = fuse_heads(attn.float(), head_fusion)
        if n_discard:
            smallest = fused.topk(n_discard, dim=-1, largest=False).indices
            fused = fused.scatter(-1, smallest, 0.0)
        mixed = fused + identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout  # later layers multiply from the left
    return rollout


def cls_attention_grid(attn_layer: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """The class token's attention over the patches, as the patch grid.

    Args:
        attn_layer: ``(B, heads, T, T)`` attention probabilities of one layer with the class
            token at index 0 and the ``gh * gw`` patch tokens last, in row-major grid order.
            A rollout ``(B, T, T)`` works too when given as ``rollout[:, None]``.
        grid_size: ``(gh, gw)``, the patch grid (``model.patch_embed.grid_size``).

    Returns:
        ``(B, heads, gh, gw)``: row 0 restricted to the patch keys. The weight the class token
        puts on itself is left out, so a map sums to less than one.
    """
    if attn_layer.ndim != 4 or attn_layer.shape[-1] != attn_layer.shape[-2]:
        raise ValueError(f"expected attention of shape (B, heads, T, T), got {tuple(attn_layer.shape)}")
    gh, gw = grid_size
    tokens = attn_layer.shape[-1]
    if tokens < 1 + gh * gw:
        raise ValueError(f"attention over {tokens} tokens cannot hold a class token and a "
                         f"{gh}x{gw} patch grid ({1 + gh * gw} tokens)")
    return attn_layer[:, :, 0, tokens - gh * gw:].reshape(*attn_layer.shape[:2], gh, gw)


def upsample_to_image(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(..., gh, gw)`` -> ``(..., H, W)`` by nearest neighbour.

    Nearest, not bilinear: a weight belongs to a whole patch, and smoothing would draw
    structure inside patches that the model cannot see.
    """
    lead = grid.shape[:-2]
    flat = grid.reshape(-1, 1, *grid.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="nearest").reshape(*lead, *size)


def normalize_layers(layers: Sequence[int], depth: int) -> list[int]:
    """Layer indices as given (negative ones count from the end) -> 0-based, duplicates removed.

    Raises ValueError naming the valid range for an index outside the model.
    """
    resolved: list[int] = []
    for layer in layers:
        if not isinstance(layer, int) or not -depth <= layer < depth:
            raise ValueError(f"layer {layer!r} does not exist: the model has {depth} layers, "
                             f"valid indices are {-depth}..{depth - 1}")
        if layer % depth not in resolved:
            resolved.append(layer % depth)
    return resolved


def render_attention_figure(
    image: torch.Tensor,
    maps: Sequence[torch.Tensor],
    grid_size: tuple[int, int],
    layers: Sequence[int],
    path: str | Path,
    prediction: tuple[str, float] | None = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    title: str | None = None,
) -> Path:
    """Write one PNG: the image, its attention rollout, and every head's class-token attention.

    Layout: the first row holds the input image and the rollout overlaid on it; then one row per
    chosen layer with one panel per head, labelled ``layer L head h``. Heat maps are upsampled to
    the image and drawn over it. The heads of one row share a colour scale (with a colour bar),
    so a sharply focused head and a diffuse one look different, as they are; the rollout, whose
    class-token row is dominated by the residual path, is scaled to its own range.

    Args:
        image: ``(C, H, W)`` in [0, 1], C = 1 or 3, as the model saw it before normalisation.
        maps: attention of every layer, each ``(1, heads, T, T)`` or ``(heads, T, T)``.
        grid_size: ``(gh, gw)`` patch grid with ``T = 1 + gh * gw``.
        layers: which layers get a row (0-based; negative counts from the end).
        path: the PNG to write; parent folders are created.
        prediction: ``(class name, probability)`` for the title.
        head_fusion, discard_ratio: passed to :func:`attention_rollout`.
        title: first title line, e.g. the file name.

    Returns:
        ``path`` as a Path.
    """
    # A bare Figure renders with Agg and leaves pyplot's global backend and figure list alone,
    # so calling this from a notebook or a server neither switches backends nor leaks figures.
    from matplotlib.figure import Figure

    maps = [m[None] if m.ndim == 3 else m for m in maps]
    _check_maps(maps)
    if maps[0].shape[0] != 1:
        raise ValueError(f"render one image at a time; got attention maps for a batch of {maps[0].shape[0]}")
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be (C, H, W) with C = 1 or 3, got {tuple(image.shape)}")
    layer_ids = normalize_layers(layers, len(maps))
    size = (int(image.shape[1]), int(image.shape[2]))
    heads = maps[0].shape[1]

    shown = image.detach().float().cpu().clamp(0, 1)
    shown_np = shown[0].numpy() if shown.shape[0] == 1 else shown.permute(1, 2, 0).numpy()
    image_kwargs = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if shown.shape[0] == 1 else {}
    rollout = cls_attention_grid(attention_rollout(maps, head_fusion, discard_ratio)[:, None], grid_size)
    rollout = upsample_to_image(rollout[0, 0], size).cpu().numpy()

    n_cols = max(heads, 2)
    panel = 2.2  # inches; keeps labels readable whatever the image resolution
    fig = Figure(figsize=(panel * n_cols + 0.8, panel * (1 + len(layer_ids)) + 0.6), layout="constrained")
    axes = fig.subplots(1 + len(layer_ids), n_cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()

    def overlay(ax, heat, vmin: float | None = None, vmax: float | None = None):
        ax.imshow(shown_np, **image_kwargs)
        # translucent, so the strokes under a hot patch stay visible
        return ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=vmin, vmax=vmax)

    axes[0, 0].imshow(shown_np, **image_kwargs)
    axes[0, 0].set_title("input", fontsize=9)
    overlay(axes[0, 1], rollout)
    axes[0, 1].set_title(f"attention rollout\n({len(maps)} layers, {head_fusion} of heads)", fontsize=9)

    for row, layer in enumerate(layer_ids, start=1):
        grids = cls_attention_grid(maps[layer], grid_size)[0]  # (heads, gh, gw)
        heat = upsample_to_image(grids, size).cpu().numpy()
        # one scale for the row: a head that spreads its attention evenly stays flat next to
        # a focused one instead of having its small differences stretched to the full range
        vmin, vmax = float(grids.min()), float(grids.max())
        for head in range(heads):
            mappable = overlay(axes[row, head], heat[head], vmin, max(vmax, vmin + 1e-6))
            axes[row, head].set_title(f"layer {layer} head {head}", fontsize=9)
        fig.colorbar(mappable, ax=list(axes[row, :heads]), shrink=0.8, pad=0.01,
                     label="class-token attention")

    lines = [title] if title else []
    if prediction is not None:
        lines.append(f"predicted: {prediction[0]} (p = {prediction[1]:.3f})")
    if lines:
        fig.suptitle("\n".join(lines), fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path, after checking that it can be the folder the figures go into:
    it may exist as a folder or not at all, but not as a file."""
    from vit.errors import ConfigError

    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out={out_dir} is a file; out names the folder that receives one "
                          f"<image stem>_attention.png per image: give a folder path")
    return path


def write_attention_figures(
    module: "ImageClassifier",
    image_paths: Sequence[Path],
    out_dir: str | Path,
    layers: Sequence[int] = (0, -1),
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> list[Path]:
    """One attention figure per image file, ``out_dir/<image stem>_attention.png``.

    Images are read and normalised exactly as :mod:`vit.predict` does (``load_image``, then the
    checkpoint's mean and std); the model runs in eval mode. Raises UserError for a model
    without attention maps, a layer that does not exist, an unreadable image, an ``out_dir``
    that is a file, or two images whose figures would have the same name.
    """
    from PIL import UnidentifiedImageError

    from vit.errors import ConfigError, UserError
    from vit.inference import NormalizedClassifier
    from vit.predict import load_image

    model = module.model
    name = module.hparams.model_name
    if not hasattr(model, "get_attention_maps"):
        raise UserError(f"attention maps need a ViT: the checkpoint's model {name!r} is a "
                        f"{type(model).__name__}, which has no attention; use a checkpoint of a vit_* model")
    if getattr(model, "num_prefix_tokens", 0) != 1:
        raise UserError(f"model {name!r} has no class token (class_token=false), so there is no "
                        f"class-token attention to show")
    if head_fusion not in ("mean", "max", "min"):
        raise ConfigError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ConfigError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    try:
        layer_ids = normalize_layers(list(layers), len(model.blocks))
    except ValueError as error:
        raise ConfigError(str(error)) from error

    out_dir = check_out_dir(out_dir)
    targets = [out_dir / f"{Path(p).stem}_attention.png" for p in image_paths]
    clashes = sorted({str(t) for t in targets if targets.count(t) > 1})
    if clashes:  # refuse before any work rather than silently overwrite one figure with another
        raise UserError(f"several images would write {', '.join(clashes)}; give images with distinct file names")

    wrapper = NormalizedClassifier.from_classifier(module).eval()
    in_chans, height, width = wrapper.input_shape
    class_names = module.hparams.class_names
    written = []
    for path, target in zip(image_paths, targets, strict=True):
        try:
            image = load_image(Path(path), in_chans, (height, width),
                               module.hparams.get("eval_resize"))  # (C, H, W) in [0, 1]
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"cannot read image {path}: {error}") from error
        batch = image[None]
        with torch.no_grad():
            probs = wrapper(batch).softmax(dim=-1)[0]
            maps = model.get_attention_maps(wrapper.normalize(batch))
        prob, index = probs.max(dim=0)
        written.append(render_attention_figure(
            image, maps, model.patch_embed.grid_size, layer_ids, target,
            prediction=(class_names[int(index)], float(prob)), head_fusion=head_fusion,
            discard_ratio=discard_ratio, title=Path(path).name))
    return written
