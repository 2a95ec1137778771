"""The throughput benchmark's attention ceiling: a model whose attention core costs nothing."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import vit

BENCH = Path(__file__).resolve().parents[1] / "bench" / "model_throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("model_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ceiling_model_skips_the_attention_core_and_keeps_the_projections(monkeypatch):
    bench = load_bench()
    model = bench.skip_attention_core(vit.create_model("vit_mnist", depth=2).eval())
    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append("sdpa"))
    monkeypatch.setattr(torch, "softmax", lambda *a, **k: calls.append("softmax"))
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append("bmm"))
    x = torch.randn(3, 1, 28, 28)
    attn = model.blocks[0].attn
    tokens = torch.randn(3, 50, attn.dim)
    with torch.no_grad():
        qkv = attn.qkv(tokens).view(3, 50, 3, attn.dim)
        expected = attn.proj(qkv[:, :, 2])  # W^O applied to the values, heads in their usual order
        torch.testing.assert_close(attn(tokens), expected)
        assert model(x).shape == (3, 10)
    assert calls == []


def test_ceiling_is_timed_and_reported_beside_the_targets(capsys):
    bench = load_bench()
    comparisons = bench.main(["--models", "vit_mnist", "--modes", "bf16", "--batch-size", "8", "--repeats", "1",
                              "--warmup", "1", "--max-background", "1", "--attention-ceiling"])
    labels = {(c.vit.label, c.vit.phase) for c in comparisons}
    assert labels == {(label, phase) for label in ("vit", bench.CEILING_LABEL) for phase in ("train", "infer")}
    assert all(c.speed_ratio > 0 and c.timm.label == "timm" for c in comparisons)
    summary = capsys.readouterr().out.split("Summary:")[1]
    assert "ceiling" in summary and "vit_mnist" in summary
