"""Attention with quantized matrix products: the two matmuls of scaled dot-product attention take quantized inputs.

    S = q_query(Q) @ q_key(K^T) * scaling + mask,    P = softmax(S),    O = q_probs(P) @ q_value(V)

Each ``q_*`` is a per-tensor :class:`~lowbit.torch.quantizer.TensorQuantizer`, a child module
(:class:`AttentionQuantizers`) of the attention module it belongs to, where calibration, QAT and export find it like
any other quantizer (the export writes QuantizeLinear/DequantizeLinear pairs straight before both inputs of both
MatMuls). :func:`quantized_attention` has the calling convention of Hugging Face ``transformers``' attention
functions, which :mod:`lowbit.torch.hf` registers it under; it needs nothing from transformers itself.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.recipe import QuantizerConfig
from lowbit.torch.layers import make_quantizer

ATTRIBUTE = "matmul_quantizers"  # the child module of an attention module that holds its AttentionQuantizers


class AttentionQuantizers(nn.Module):
    """The quantizers of the four inputs of an attention's two matmuls: ``query`` and ``key`` (of ``Q K^T``),
    ``probs`` and ``value`` (of ``P V``), each per tensor as ``cfg`` says, named ``{name}.query`` and so on."""

    INPUTS = ("query", "key", "probs", "value")

    def __init__(self, cfg: QuantizerConfig, name: str = ""):
        super().__init__()
        for kind in self.INPUTS:
            # A per-channel or per-group activation config still quantizes these per tensor: their axes are heads
            # and positions, not the features a layer's channels are.
            self.add_module(kind, make_quantizer(_per_tensor(cfg), 1, f"{name}.{kind}"))


def _per_tensor(cfg: QuantizerConfig) -> QuantizerConfig:
    return cfg if cfg.granularity == "tensor" else replace(cfg, granularity="tensor", group_size=None)


def quantized_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose matmul inputs pass through ``module``'s :class:`AttentionQuantizers` (plain eager
    attention when it has none): the formula of the module docstring, ``scaling`` defaulting to ``D^-1/2``.

    ``query`` (B, H, Lq, D); ``key`` and ``value`` (B, Hkv, Lk, D), repeated to H heads when Hkv < H (grouped-query
    attention); ``attention_mask``: an additive float mask broadcastable to (B, H, Lq, Lk) (or a boolean one, True
    where attended). Returns the output transposed to (B, Lq, H, D) and P, as transformers' eager attention does.
    Soft-capping, attention sinks and the other extras of some architectures (``kwargs``) are not applied.
    """
    quantizers = getattr(module, ATTRIBUTE, None)
    if key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    key_t = key.transpose(-1, -2)  # quantized after the transpose, so that each DequantizeLinear feeds a MatMul
    if quantizers is not None:
        query, key_t = quantizers.query(query), quantizers.key(key_t)
    scores = torch.matmul(query, key_t) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        mask = attention_mask[..., : key_t.shape[-1]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    if quantizers is not None:
        out = torch.matmul(quantizers.probs(probs), quantizers.value(value))
    else:
        out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs
