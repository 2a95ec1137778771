"""Building blocks of a Vision Transformer.

Shapes used throughout: B batch, N query tokens, M key/value tokens, D embedding
width, H heads, Dh = D // H head width, C image channels.

Sub-module names follow timm's ``vision_transformer.py`` (``qkv``, ``proj``,
``norm1``, ``ls1``, ``mlp.fc1`` ...) so that a state dict moves between the two
packages without renaming; see :mod:`vit.timm_interop`.
"""
from __future__ import annotations

import math
from functools import cache, partial
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

AttentionImpl = Literal["auto", "fused", "explicit", "tiled"]

# timm and the original JAX ViT both use eps=1e-6; matching it keeps outputs equal.
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def to_2tuple(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(28, 32)`` stays. Anything else is a ValueError naming ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    if min(pair) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


class PatchEmbed(nn.Module):
    """Cut an image into non-overlapping patches and embed each one linearly.

    A ``P x P`` convolution with stride ``P`` applies the same ``(C*P*P) -> D``
    matrix to every flattened patch, i.e. it *is* the paper's linear patch
    projection, only without materialising the unfolded patches.

    ``(B, C, H, W) -> (B, N, D)`` with ``N = (H / P) * (W / P)``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size, "img_size")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        for axis, size, patch in zip(("height", "width"), self.img_size, self.patch_size):
            if size % patch:
                raise ValueError(
                    f"image {axis} {size} is not divisible by patch size {patch}; "
                    f"choose an img_size that is a multiple of patch_size"
                )
        if in_chans <= 0:
            raise ValueError(f"in_chans must be positive, got {in_chans}")
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"expected images of shape (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


# Bytes of one tile's (images, H, N, M) scores in the tiled path: small enough to stay in a
# core's L2 cache between the matmuls and the softmax (1 MiB measured best on this CPU).
TILE_BYTES = 1 << 20


def _tiles(q: torch.Tensor, num_keys: int, for_inference: bool) -> list[tuple[int, int]]:
    """Split the batch of q (B, H, N, Dh) into runs of images whose scores fill about ``TILE_BYTES``.

    For inference a tile's scores are also kept under half the size of q itself, so that its
    temporaries never outweigh one (B, N, D) activation and the peak memory stays at or below the
    fused kernel's. Training needs no such cap (its peak is the stored activations), and fewer,
    larger tiles cost less Python overhead per step.
    """
    batch, heads, num_queries, _ = q.shape
    per_image = heads * num_queries * num_keys * q.element_size()
    budget = min(TILE_BYTES, q.numel() * q.element_size() // 2) if for_inference else TILE_BYTES
    step = max(1, budget // per_image)
    return [(start, min(batch, start + step)) for start in range(0, batch, step)]


def _tile_probabilities(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, scale: float,
                        start: int, stop: int) -> torch.Tensor:
    """softmax(q k^T * scale) over keys for images ``start:stop``: (b, H, N, M).

    The backward pass calls this again for the same tile; the same operations in the same order
    give bit-identical probabilities to the forward pass's.
    """
    scores = torch.matmul(q[start:stop], k[start:stop].transpose(-2, -1)).mul_(scale)
    if allowed is not None:
        tile_mask = allowed[start:stop] if allowed.ndim == 4 and allowed.shape[0] > 1 else allowed
        scores.masked_fill_(~tile_mask, float("-inf"))
    if scores.device.type == "cpu":  # row by row, so the CPU kernel may write over its input
        return torch.softmax(scores, dim=-1, out=scores)
    return scores.softmax(dim=-1)


# Smallest row sum of exp(scores) the normalise-last path accepts: the row's largest term is then
# a normal float with full relative precision (the fp32 / bf16 normal range ends near 1.2e-38).
_MIN_EXP_ROW_SUM = 1e-30
# exp(scores) of a few images at a time in that path: 4 MiB was as fast as the whole batch at once
# here (1 MiB was 5-15% slower). With the copies of q, k, v made block by block too, vit_cifar's
# bf16 inference peaks at 1.14x timm's (1.30x with neither, 1.22x with whole-batch copies).
_SCORE_BLOCK_BYTES = 4 << 20


def _attention_normalised_last(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               allowed: torch.Tensor | None, scale: float,
                               temporary_bytes: int | None = None) -> torch.Tensor | None:
    """``softmax(q k^T * scale) v`` for inference, with softmax's division moved after the value product.

    q (B, H, N, Dh), k and v (B, H, M, Dh) -> (B, H, N, Dh), a view of a (B, N, H, Dh) tensor so
    that concatenating the heads afterwards costs no copy.

    ``softmax(S) V = diag(1 / rowsum(E)) (E V)`` with ``E = exp(S)``. Appending a column of ones
    to V makes the one matmul ``E [V, 1]`` return the row sums too (accumulated in fp32 by the
    GEMM). The softmax kernel's max and sum over each short row are skipped: on the CPU they
    cost far more than the matmuls (bf16, vit_mnist's 50 keys: 1.1 ms against 0.12 ms for
    ``q k^T``), and N*Dh divisions replace N*M. Without the row maximum subtracted exp may
    overflow, or a row may underflow: then ``None`` is returned and the caller computes the
    ordinary softmax, so the result never depends on the logits' range.

    A few images at a time go through reused buffers (head-major copies of q, k and [v, 1], E and
    ``E [V, 1]``). ``temporary_bytes`` bounds them and the fp32 row sums together (at least one
    image per block). In bf16 the multiply by fp32 reciprocals briefly adds fp32 copies of one
    block's output on top; counting them too halved the blocks and cost vit_mnist's and vit_tiny's
    bf16 inference 11-16% for no lower model peak. By default only E is bounded, to
    ``_SCORE_BLOCK_BYTES``, which keeps the fewest, largest blocks, and a batch that fits one
    block frees its copies before the output is allocated.
    """
    B, H, N, Dh = q.shape
    M = k.shape[-2]
    dtype = _compute_dtype(q, v)
    element = dtype.itemsize
    if temporary_bytes is None:
        images = _SCORE_BLOCK_BYTES // (H * N * M * element)
    else:  # what is left once the fp32 row sums of the whole batch are held
        per_image = H * (N * M + N * Dh + M * Dh + (M + N) * (Dh + 1)) * element
        images = (temporary_bytes - B * H * N * 4) // per_image
    step = min(B, max(1, images))
    empty = partial(torch.empty, dtype=dtype, device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        out = None
        inverse_sums = torch.empty(B, H, N, 1, dtype=torch.float32, device=q.device)
        scaled_q, keys, values_and_ones = empty(step, H, N, Dh), empty(step, H, M, Dh), empty(step, H, M, Dh + 1)
        values_and_ones[..., Dh].fill_(1)
        weighted, exp_block = empty(step, H, N, Dh + 1), empty(step * H, N, M)
        for start in range(0, B, step):
            stop = min(B, start + step)
            n = stop - start
            torch.mul(q[start:stop], scale, out=scaled_q[:n])  # contiguous (n*H, N, Dh) batches for bmm
            keys[:n].copy_(k[start:stop])
            values_and_ones[:n, ..., :Dh].copy_(v[start:stop])
            exp_scores = exp_block[: n * H]
            torch.bmm(scaled_q[:n].flatten(0, 1), keys[:n].flatten(0, 1).transpose(1, 2), out=exp_scores).exp_()
            if allowed is not None:
                block_mask = allowed[start:stop] if allowed.ndim == 4 and allowed.shape[0] > 1 else allowed
                exp_scores.view(n, H, N, M).masked_fill_(~block_mask, 0.0)
            torch.bmm(exp_scores, values_and_ones[:n].flatten(0, 1), out=weighted[:n].flatten(0, 1))
            if out is None:
                if step == B:  # a single block: its inputs are freed before the output exists
                    del scaled_q, keys, values_and_ones, exp_block, exp_scores
                out = empty(B, N, H, Dh).transpose(1, 2)
            # Multiplying by fp32 reciprocals: a bf16 divisor broadcast over rows of Dh = 16 has no
            # vectorised CPU kernel and runs about 5x slower.
            block_inverse = inverse_sums[start:stop]
            block_inverse.copy_(weighted[:n, ..., Dh:]).reciprocal_()  # inf where a row underflowed
            torch.mul(weighted[:n, ..., :Dh], block_inverse, out=out[start:stop])
        # Checked once at the end: a row sum that overflowed gives a zero reciprocal, one that
        # underflowed a huge one, and an overflowing value product a non-finite output.
        if not (inverse_sums.amin() > 0 and inverse_sums.amax() <= 1 / _MIN_EXP_ROW_SUM
                and torch.isfinite(out.sum())):
            return None
    return out


class TiledAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + mask) v``, computed a few images at a time, probabilities recomputed
    in the backward pass instead of stored.

    Same mathematics as the explicit path, two differences in how it is evaluated:

    * **Memory.** Plain autograd keeps every layer's (B, H, N, M) probabilities for the backward
      pass, which for short sequences is more than the rest of the layer's activations together.
      Here only q, k and v are kept (as the fused kernel does) and each tile's probabilities are
      recomputed when its gradient is needed (selective activation recomputation).
    * **Cache.** A tile's scores (``TILE_BYTES``) stay in cache from the first matmul through the
      softmax to the second, instead of streaming the whole (B, H, N, M) tensor through memory
      three times.

    Backward, per tile, with P the probabilities and dO the output gradient:
    ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(dP * P))`` (softmax's Jacobian),
    ``dQ = dS K * scale``, ``dK = dS^T Q * scale``.

    Inputs q (B, H, N, Dh), k and v (B, H, M, Dh), ``allowed`` None or bool broadcastable to
    (B, H, N, M); ``for_inference`` when no gradient will be asked (smaller tiles, see
    :func:`_tiles`). Output (B, H, N, Dh). Under autocast the computation runs in the autocast
    dtype, as the explicit path's matmuls would.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                scale: float, for_inference: bool = False) -> torch.Tensor:
        ctx.input_dtypes = (q.dtype, k.dtype, v.dtype)
        dtype = _compute_dtype(q, v)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        if not for_inference:
            # One copy each, kept for backward instead of the views (the projection they view is
            # then freed), saves copying every tile twice more in the backward pass. Inference
            # copies only tiles: a whole copy would add to its peak memory.
            q, k, v = (t.contiguous() for t in (q, k, v))
        B, H, N, Dh = q.shape
        # Written in (B, N, H, Dh) order, so that concatenating the heads afterwards is a free view.
        out = q.new_empty(B, N, H, Dh).transpose(1, 2)
        with torch.autocast(q.device.type, enabled=False):
            for start, stop in _tiles(q, k.shape[2], for_inference):
                probs = _tile_probabilities(q, k, allowed, scale, start, stop)
                torch.matmul(probs, v[start:stop], out=out[start:stop])
                del probs
        ctx.save_for_backward(q, k, v, allowed)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, allowed = ctx.saved_tensors
        scale = ctx.scale
        grad_out = grad_out.to(q.dtype).contiguous()
        grad_q, grad_k, grad_v = (torch.empty_like(t) for t in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):
            for start, stop in _tiles(q, k.shape[2], for_inference=False):
                probs = _tile_probabilities(q, k, allowed, scale, start, stop)
                d_out = grad_out[start:stop]
                torch.matmul(probs.transpose(-2, -1), d_out, out=grad_v[start:stop])
                d_probs = torch.matmul(d_out, v[start:stop].transpose(-2, -1))
                d_scores = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)
                del probs, d_probs
                torch.matmul(d_scores, k[start:stop], out=grad_q[start:stop]).mul_(scale)
                torch.matmul(d_scores.transpose(-2, -1), q[start:stop], out=grad_k[start:stop]).mul_(scale)
                del d_scores
        q_dtype, k_dtype, v_dtype = ctx.input_dtypes
        return grad_q.to(q_dtype), grad_k.to(k_dtype), grad_v.to(v_dtype), None, None, None


def _compute_dtype(q: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The dtype the explicit path's matmuls would run in: autocast's, else the inputs' common one."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return torch.promote_types(q.dtype, v.dtype)


def _traced() -> bool:
    """True while torch.compile, torch.export, ONNX export or torch.jit.trace records the model."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _records_graph(*tensors: torch.Tensor) -> bool:
    """True when autograd records operations on any of ``tensors`` (training, not inference)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# Fewest attention scores (B * H * N^2) for which the explicit path beats the fused kernel in bf16
# at inference on a CPU without AMX (a batch of one vit_cifar image has 51 k).
EXPLICIT_MIN_SCORES_BF16_INFERENCE = 100_000


@cache
def _cpu_has_amx_bf16() -> bool:
    """True on CPUs with AMX bf16 tiles (Intel Sapphire Rapids and later), where oneDNN's bf16
    kernels, the fused attention's among them, run on the matrix unit."""
    return bool(torch.cpu.get_capabilities().get("amx_bf16", False))


def _choose_attention_path(q: torch.Tensor) -> str:
    """The path ``attn_impl='auto'`` takes for queries q (B, H, N, Dh): 'fused' or 'explicit'.

    Training or inference is read from q: autograd records it (``requires_grad``) when training.
    Rule, CPU only (elsewhere the fused flash / memory-efficient kernels win):

    * bf16 training: explicit while N <= 256 tokens, or at any length with heads of Dh >= 64.
    * bf16 inference, same lengths: on a CPU without AMX, explicit from
      ``EXPLICIT_MIN_SCORES_BF16_INFERENCE`` scores (0.1 M), fused below; with AMX, fused.
    * anything else (fp32, fp16, long sequences): ``F.scaled_dot_product_attention``.

    Why with AMX (torch 2.14.1, 2-core Intel Xeon (Sapphire Rapids) with amx_bf16; re-check
    with ``python bench/model_throughput.py --attn-impl-sweep --modes bf16``), whole-model
    speed against timm, bf16: training as without AMX, explicit 3.4x (vit_cifar), 4.2x
    (vit_mnist), 1.36x (vit_tiny) against fused's 0.97-1.00x: the fused backward stays slow.
    At inference the fused kernel is fast there (timm's bf16 inference ran 0.87-2.9x its fp32 speed)
    and explicit no longer wins: in inference-only processes (``--phases infer``, 11 rounds) fused
    0.89-0.98x, explicit 0.89-0.92x, tiled 0.78-0.91x; after training, in one process, over two
    sweeps, fused 0.96-1.07x, explicit 0.87-1.16x, tiled 0.79-1.11x. The fused kernel is timm's
    own, so its ratio is the noise; explicit tied for 16-dim heads (its sign changed between
    processes) and lost for vit_tiny's 64-dim heads every time (0.87-0.92x).

    Why without AMX (torch 2.14.1, 2-core AMD EPYC with avx512_bf16; re-check with
    ``python bench/model_throughput.py --attn-impl-sweep``, at several ``--batch-size``),
    whole-model speed against timm:

    * fp32: no path beats the fused kernel in a process that has not called
      ``torch.set_num_threads``. Tiled, batch 128, train / inference: vit_cifar 0.92-0.97x /
      0.93-0.96x, vit_mnist 0.85-0.89x / 0.81-0.89x timm's speed (explicit is no better and stores
      the probabilities). Calling ``torch.set_num_threads`` (any count) turns off MKL's dynamic
      threading; that left vit's tiled steps as fast as before but slowed timm's fused kernel and
      linear layers by 8-30%, so there tiled ran at 1.01-1.16x timm's speed. Choose
      ``attn_impl='tiled'`` by hand in a process that calls it.
    * bf16: the fused CPU kernel is slow, its backward above all. Explicit (train / inference):
      vit_cifar 2.8-3.2x / 1.33-1.52x, vit_mnist 3.4-4.4x / 1.46-1.72x, vit_tiny (197 tokens,
      Dh 64) 1.40-1.50x / 1.25-1.34x. ``attn_impl='tiled'`` keeps the fused kernel's model peak:
      training 2.83x, 3.34x, 1.33x (recomputation, many small bf16 matmuls); inference, the
      normalise-last form with its temporaries within one activation, 1.38x, 1.31x, 1.23x against
      explicit's 1.37x, 1.58x, 1.24x in the same run (vit_mnist's small blocks cost most).
      Attention alone at 577 tokens loses with narrow heads (Dh 16: 0.9x / 0.66x) and wins with
      wide ones (Dh 32: 1.0x / 1.5x, Dh 64: 1.8x / 1.85x); the rule keeps Dh 32 on fused for
      training's sake.
      Small inference batches lose: vit_mnist batch 1, 4, 8 (10-80 k scores) 0.70x, 0.86x,
      0.97x, vit_cifar batch 1 (51 k) 0.87x, against fused 1.00-1.02x; from vit_tiny batch 1
      (116 k: 1.05x), vit_mnist batch 16 (160 k: 1.15x) and vit_cifar batch 4 (203 k: 1.10x)
      explicit wins. Training wins at every batch size tried (vit_cifar batch 1: 1.21x).
      MKL's threading mode made no consistent difference in bf16 (its matmuls run in oneDNN).
    * fp16: explicit runs at 0.2-0.7x (this CPU has no fast fp16 matmul).
    """
    if q.device.type != "cpu":
        return "fused"
    batch, heads, num_tokens, head_dim = q.shape
    phase = "train" if _records_graph(q) else "infer"
    # A tracer with a dynamic batch must not branch on its size: it gets the large-batch answer.
    scores = float("inf") if _traced() else batch * heads * num_tokens**2
    if q.dtype == torch.bfloat16 and (num_tokens <= 256 or head_dim >= 64):
        if phase == "train":
            return "explicit"
        if not _cpu_has_amx_bf16() and scores >= EXPLICIT_MIN_SCORES_BF16_INFERENCE:
            return "explicit"
    return "fused"


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention, written out step by step.

    For each head h: ``Q_h = x W_h^Q``, ``K_h = c W_h^K``, ``V_h = c W_h^V`` with
    ``c = context`` (or ``x`` for self-attention), then
    ``head_h = softmax(Q_h K_h^T / sqrt(Dh) + mask) V_h`` and finally
    ``out = concat(head_1, ..., head_H) W^O``.

    The per-head matrices W_h^Q, W_h^K, W_h^V are the row blocks of one
    ``qkv`` linear layer (``3D x D``), so self-attention costs one matmul; for
    cross-attention the query rows are applied to ``x`` and the key/value rows
    to ``context``. ``proj`` is W^O.

    Three paths give the same numbers (``attn_impl``): ``'fused'``, torch's
    ``scaled_dot_product_attention`` kernel; ``'explicit'``, the steps above as written,
    which can return the attention weights (at inference, when no weights are asked for, it
    divides by softmax's row sums after the value product instead:
    :func:`_attention_normalised_last`); ``'tiled'``, the same steps a few images at a
    time with the probabilities recomputed in backward (:class:`TiledAttention`; at
    inference the normalise-last form, its temporaries within one (B, N, D) activation),
    which keeps a ViT's peak memory at the fused kernel's. ``'auto'`` (default) takes the fastest
    for the device, dtype and sequence (:func:`_choose_attention_path`); requesting the
    weights always takes the explicit path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: AttentionImpl = "auto",
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0:
            raise ValueError(f"dim and num_heads must be positive, got dim={dim}, num_heads={num_heads}")
        if dim % num_heads:
            raise ValueError(
                f"embed_dim {dim} is not divisible by num_heads {num_heads}; "
                f"each head needs an equal share of the embedding"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # qk-norm (ViT-22B): LayerNorm over each head's queries and keys keeps logits bounded.
        self.q_norm = LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def attn_impl(self) -> AttentionImpl:
        """'auto', 'fused', 'explicit' or 'tiled'; may be changed on a built model."""
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, value: AttentionImpl) -> None:
        if value not in ("auto", "fused", "explicit", "tiled"):
            raise ValueError(f"attn_impl must be 'auto', 'fused', 'explicit' or 'tiled', got {value!r}")
        self._attn_impl = value

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) -> (B, H, N, Dh)``"""
        B, N, _ = t.shape
        return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _project_qkv(
        self, x: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries from ``x`` (B, N, D); keys and values from ``context`` (B, M, D) or ``x``.

        Returns q (B, H, N, Dh), k and v (B, H, M, Dh).
        """
        B, N, _ = x.shape
        if context is None:
            qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            w_q, w_kv = self.qkv.weight.split([self.dim, 2 * self.dim])
            b_q, b_kv = self.qkv.bias.split([self.dim, 2 * self.dim]) if self.qkv.bias is not None else (None, None)
            q = self._split_heads(F.linear(x, w_q, b_q))
            k, v = (self._split_heads(t) for t in F.linear(context, w_kv, b_kv).chunk(2, dim=-1))
        return self.q_norm(q), self.k_norm(k), v

    def _allowed(
        self, mask: torch.Tensor | None, causal: bool, n_query: int, n_key: int, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean (…, N, M) tensor, True where a query may attend to a key; None if all may."""
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
            try:
                torch.broadcast_shapes(mask.shape, (1, self.num_heads, n_query, n_key))
            except RuntimeError:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not broadcast to "
                    f"(B, heads={self.num_heads}, N_query={n_query}, N_key={n_key})"
                ) from None
        if causal:
            # Query i sees keys 0..i, the same top-left alignment as SDPA's is_causal.
            causal_mask = torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril()
            mask = causal_mask if mask is None else mask & causal_mask
        return mask

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        return_attention: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``x`` (B, N, D) to ``context`` (B, M, D), or to itself.

        Args:
            mask: bool, broadcastable to (B, H, N, M); True where attention is allowed.
                A query row with no allowed key has no defined output (NaN), as in SDPA.
            causal: query i attends only to keys 0..i (a decoder's self-attention).
            return_attention: also return the attention probabilities (B, H, N, M).

        Returns:
            (B, N, D), or ``(output, attention)`` when ``return_attention``.
        """
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        if context is not None and (context.ndim != 3 or context.shape[-1] != self.dim
                                    or context.shape[0] != x.shape[0]):
            raise ValueError(
                f"expected context of shape ({x.shape[0]}, M, {self.dim}), got {tuple(context.shape)}"
            )
        q, k, v = self._project_qkv(x, context)
        allowed = self._allowed(mask, causal, q.shape[-2], k.shape[-2], x.device)
        dropout_p = self.attn_drop.p if self.training else 0.0

        path = self.attn_impl
        if return_attention:
            path = "explicit"
        elif path == "auto":
            path = _choose_attention_path(q)
        if path == "tiled" and (dropout_p > 0 or _traced()):
            # Dropout would have to be replayed in the recomputation; a tracer would bake the
            # Python loop over tiles into its graph for one batch size (compilers fuse the
            # explicit path their own way).
            path = "explicit"
        attn = None
        if (path in ("explicit", "tiled") and not return_attention and dropout_p == 0
                and not _records_graph(q, k, v) and not _traced()):
            # Inference needs no probabilities; a tracer cannot follow the range check's branch.
            # 'tiled' bounds the temporaries by one (B, N, D) activation, so that a ViT's peak,
            # which its MLP sets, stays at the fused kernel's (tests/test_attention.py, the bench).
            budget = q.numel() * _compute_dtype(q, v).itemsize if path == "tiled" else None
            out = _attention_normalised_last(q, k, v, allowed, self.scale, budget)
            if out is not None:
                path = "normalised_last"
            # else exp left the float range: the max-subtracted softmax of the path below
        if path == "explicit":
            scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, M)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            attn = scores.softmax(dim=-1)
            del scores  # frees the (B, H, N, M) scores before the next matmul allocates
            out = self.attn_drop(attn) @ v  # (B, H, N, Dh)
            if not return_attention:
                attn = None
        elif path == "tiled":
            out = TiledAttention.apply(q, k, v, allowed, self.scale, not _records_graph(q, k, v))
        elif path == "fused":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)

        del q, k, v  # the (B, N, 3D) projection they view is not needed any more: free it before proj
        out = out.transpose(1, 2).reshape(x.shape)  # concatenate heads: (B, N, H*Dh)
        out = self.proj_drop(self.proj(out))
        return (out, attn) if return_attention else out


class Mlp(nn.Module):
    """Position-wise feed-forward network: ``(B, N, D) -> (B, N, hidden) -> (B, N, D)``."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (CaiT), initialised small."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample with probability ``p``.

    Survivors are scaled by ``1 / (1 - p)`` so the expected output is unchanged.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one coin per sample
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm Transformer encoder block.

    ``x = x + DropPath(LayerScale(Attention(LayerNorm(x))))``
    ``x = x + DropPath(LayerScale(Mlp(LayerNorm(x))))``; shape (B, N, D) throughout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        attn_impl: AttentionImpl = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, attn_impl)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) -> (B, N, D), plus the attention (B, H, N, N) when asked."""
        if return_attention:
            attended, attn = self.attn(self.norm1(x), return_attention=True)
        else:
            attended, attn = self.attn(self.norm1(x)), None
        x = x + self.drop_path1(self.ls1(attended))
        del attended  # not kept alive through the MLP: inference peak memory equals timm's
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, attn) if return_attention else x


def sincos_2d_position_embedding(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MoCo v3, "Simple ViT").

    A quarter of the channels encode sin/cos of the row index, a quarter of the
    column index, at geometrically spaced frequencies. Returns (gh * gw, dim).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_size[0], dtype=torch.float32),
        torch.arange(grid_size[1], dtype=torch.float32),
        indexing="ij",
    )
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows = rows.flatten()[:, None] * omega[None, :]
    cols = cols.flatten()[:, None] * omega[None, :]
    return torch.cat([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=1)


def resample_position_embedding(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resize learned position embeddings to another patch grid (ViT fine-tuning at a new resolution).

    ``(1, prefix + gh*gw, D) -> (1, prefix + new_gh*new_gw, D)``: the grid part is
    interpolated bicubically as a D-channel image; class-token entries are kept.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos_embed.ndim != 3 or pos_embed.shape[1] != expected:
        raise ValueError(
            f"position embedding of shape {tuple(pos_embed.shape)} does not match a "
            f"{old_grid[0]}x{old_grid[1]} grid with {num_prefix_tokens} prefix token(s) (expected {expected} tokens)"
        )
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    orig_dtype = grid.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(orig_dtype)
    return torch.cat([prefix, grid], dim=1)


def grid_from_length(num_tokens: int, num_prefix_tokens: int) -> tuple[int, int]:
    """Infer a square patch grid from a position-embedding length (checkpoints do not store it)."""
    side = math.isqrt(num_tokens - num_prefix_tokens)
    if side * side != num_tokens - num_prefix_tokens:
        raise ValueError(
            f"cannot infer the patch grid of a position embedding with {num_tokens} tokens "
            f"({num_prefix_tokens} prefix); it is not square"
        )
    return side, side
