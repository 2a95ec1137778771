"""Multi-head attention, written the way the lecture writes it.

Shapes: B batch, N query tokens, M key/value tokens, D embedding width, H heads,
Dh = D // H the width of one head.

For each head h, with ``c`` the context (``x`` itself for self-attention)::

    Q_h = x W_h^Q,  K_h = c W_h^K,  V_h = c W_h^V
    head_h = softmax(Q_h K_h^T / sqrt(Dh) + mask) V_h
    out = concat(head_1, ..., head_H) W^O

:func:`scaled_dot_product_attention` is the middle line for all heads at once.
:class:`MultiHeadAttention` adds the projections. torch's fused kernel computes the same
numbers faster in most cases; ``attn_impl`` chooses between the two.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vit.layers import LayerNorm

AttentionImpl = Literal["auto", "explicit", "fused"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "explicit", "fused")


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T / sqrt(Dh)) v`` for every head at once, step by step.

    Args:
        q: queries (B, H, N, Dh).
        k, v: keys and values (B, H, M, Dh).
        mask: bool, broadcastable to (B, H, N, M); True where query n may attend to key m.
        dropout_p: probability of dropping an attention weight (training only).
        scale: what the scores are multiplied by; 1 / sqrt(Dh) when None.

    Returns:
        ``(output, weights)``: output (B, H, N, Dh), weights (B, H, N, M), each row a
        probability distribution over the keys. A query that may attend to no key gets
        all-zero weights and a zero output (softmax over nothing is undefined; torch's fused
        kernel returns zeros there too).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5  # keeps the scores' variance near 1 whatever the head width
    # Scaling q before the product is the same maths as scaling the scores, on N*Dh numbers
    # instead of N*M.
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, M): how well each query matches each key
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: no weight on masked keys
    weights = scores.softmax(dim=-1)
    if mask is not None:
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)  # rows with no key were NaN
    output = F.dropout(weights, dropout_p) @ v if dropout_p > 0 else weights @ v  # (B, H, N, Dh)
    return output, weights


def choose_attention_path(q: torch.Tensor) -> str:
    """What ``attn_impl='auto'`` takes for queries q (B, H, N, Dh): 'explicit' or 'fused'.

    Explicit for bf16 training on a CPU, where torch's fused kernel has a slow backward; the
    fused kernel everywhere else. Training is read from q: autograd records it when training.
    """
    training = torch.is_grad_enabled() and q.requires_grad
    return "explicit" if training and q.device.type == "cpu" and q.dtype == torch.bfloat16 else "fused"


class MultiHeadAttention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention to a ``context``.

    The per-head matrices W_h^Q, W_h^K, W_h^V are the row blocks of one ``qkv`` linear
    layer (3D x D), so self-attention projects with one matmul; for cross-attention the
    query rows act on ``x`` and the key and value rows on ``context``. ``proj`` is W^O.
    The names match timm's, so a state dict moves between the two unchanged.

    ``attn_impl`` picks how the middle step runs; both give the same numbers:

    * ``'explicit'``: :func:`scaled_dot_product_attention` above, the steps as written.
    * ``'fused'``: torch's ``F.scaled_dot_product_attention`` kernel, which never stores the
      (B, H, N, M) weights.
    * ``'auto'`` (default): explicit for bf16 training on a CPU, where torch's fused
      backward is slow (bench/README.md has the measurements); fused otherwise.

    Asking for the weights (``return_attention=True``) always takes the explicit path:
    the fused kernel does not return them.

    ``locality=True`` makes it locality self-attention (Lee et al. 2021), for small datasets:
    the softmax temperature is learned instead of fixed at 1 / sqrt(Dh), and in
    self-attention no token attends to itself. Both paths apply it through the mask and scale.
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
        locality: bool = False,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0:
            raise ValueError(f"dim and num_heads must be positive, got dim={dim}, num_heads={num_heads}")
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}; "
                             f"each head needs an equal share of the embedding")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # qk-norm (ViT-22B): LayerNorm over each head's queries and keys keeps the logits bounded.
        self.q_norm = LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Locality self-attention (Lee et al. 2021): a learned softmax temperature, starting at the
        # usual 1 / sqrt(Dh) (stored as its log, so it stays positive), and no token attends to
        # itself, so the weights go to the other tokens and attention can grow sharper.
        self.locality = locality
        self.temperature = nn.Parameter(torch.tensor(math.log(self.head_dim**-0.5))) if locality else None

    @property
    def attn_impl(self) -> AttentionImpl:
        """``'auto'``, ``'explicit'`` or ``'fused'``; may be changed on a built model."""
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, value: AttentionImpl) -> None:
        if value not in ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {', '.join(map(repr, ATTENTION_IMPLS))}, got {value!r}")
        self._attn_impl = value

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
            mask: bool, broadcastable to (B, H, N, M); True where attention is allowed. A query
                with no allowed key gets a zero output on every path.
            causal: query i attends only to keys 0..i (a decoder's self-attention).
            return_attention: also return the attention weights (B, H, N, M).

        Returns:
            (B, N, D), or ``(output, weights)`` when ``return_attention``.
        """
        self._check_inputs(x, context)
        B, N, _ = x.shape
        q, k, v = self._project(x, context)  # (B, H, N, Dh), (B, H, M, Dh), (B, H, M, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        scale = None  # 1 / sqrt(Dh)
        if self.locality:  # the learned temperature replaces 1 / sqrt(Dh)
            q, scale = q * self.temperature.exp(), 1.0
        no_self = self.locality and context is None
        mask = self._attention_mask(mask, causal, no_self, (B, self.num_heads, N, k.shape[2]), x.device)
        dropout_p = self.attn_drop.p if self.training else 0.0

        if return_attention or self._path(q) == "explicit":
            out, weights = scaled_dot_product_attention(q, k, v, mask, dropout_p, scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
            weights = None

        out = out.transpose(1, 2).reshape(B, N, self.dim)  # concatenate the heads: (B, N, H * Dh)
        out = self.proj_drop(self.proj(out))  # W^O
        return (out, weights) if return_attention else out

    def _project(self, x: torch.Tensor, context: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries from ``x`` (B, N, D), keys and values from ``context`` (B, M, D) or ``x``; split into heads."""
        if context is None:  # self-attention: the three projections in one matmul
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:  # the rows of qkv that make queries act on x, the others on the context
            w_q, w_kv = self.qkv.weight.split([self.dim, 2 * self.dim])
            b_q, b_kv = (None, None) if self.qkv.bias is None else self.qkv.bias.split([self.dim, 2 * self.dim])
            q = F.linear(x, w_q, b_q)
            k, v = F.linear(context, w_kv, b_kv).chunk(2, dim=-1)
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, H, N, Dh): head h owns channels h*Dh .. (h+1)*Dh - 1."""
        B, N, _ = t.shape
        return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _path(self, q: torch.Tensor) -> str:
        return choose_attention_path(q) if self.attn_impl == "auto" else self.attn_impl

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        if context is not None and (context.ndim != 3 or context.shape[-1] != self.dim
                                    or context.shape[0] != x.shape[0]):
            raise ValueError(f"expected context of shape ({x.shape[0]}, M, {self.dim}), got {tuple(context.shape)}")

    def _attention_mask(self, mask: torch.Tensor | None, causal: bool, no_self: bool,
                        scores_shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor | None:
        """Bool (..., N, M), True where a query may attend to a key; None when every pair may.

        The user's ``mask`` (checked to broadcast to ``scores_shape``, (B, H, N, M)), combined with
        the causal mask and, for locality self-attention (``no_self``), the mask of the diagonal.
        """
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
            try:
                if torch.broadcast_shapes(mask.shape, scores_shape) != scores_shape:
                    raise RuntimeError  # a mask with more or larger dimensions would enlarge the scores
            except RuntimeError:
                B, H, N, M = scores_shape
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the attention "
                                 f"scores' shape (B={B}, heads={H}, N_query={N}, N_key={M})") from None
        n_query, n_key = scores_shape[2:]
        if causal:  # query i sees keys 0..i: the same top-left alignment as torch's is_causal
            causal_mask = torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril()
            mask = causal_mask if mask is None else mask & causal_mask
        if no_self:
            not_self = ~torch.eye(n_query, n_key, dtype=torch.bool, device=device)
            mask = not_self if mask is None else mask & not_self
        return mask
