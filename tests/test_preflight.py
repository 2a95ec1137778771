"""Pre-flight memory estimates: measured activations, and a clear stop when a batch cannot fit."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vit
from vit.errors import ConfigError
from vit.preflight import MiB, activation_bytes_per_image, check_batch_fits, estimate_training_memory


def test_activation_memory_scales_with_tokens_and_halves_in_bf16():
    small = vit.create_model("vit_mnist", depth=2)
    per_image = activation_bytes_per_image(small, (1, 28, 28))
    bigger_grid = vit.create_model("vit_mnist", depth=2, img_size=56)  # 4x the patches
    assert activation_bytes_per_image(bigger_grid, (1, 56, 56)) > 3 * per_image
    deeper = vit.create_model("vit_mnist", depth=4)
    assert activation_bytes_per_image(deeper, (1, 28, 28)) == pytest.approx(2 * per_image, rel=0.2)
    bf16 = activation_bytes_per_image(small, (1, 28, 28), torch.bfloat16)
    assert bf16 < per_image  # matmul inputs saved in bf16; norms and the residual stream stay fp32


def test_estimate_counts_weights_gradients_and_adamw_state():
    model = vit.create_model("linear_mnist")
    estimate = estimate_training_memory(model, (1, 28, 28), batch_size=64)
    assert estimate.parameters == estimate.gradients == 7850 * 4
    assert estimate.optimizer_state == 2 * 7850 * 4
    assert estimate.total == estimate.parameters * 4 + estimate.activations


def test_a_batch_that_cannot_fit_stops_with_numbers_and_advice():
    model = vit.create_model("vit_tiny_patch16_224", depth=2)
    estimate = estimate_training_memory(model, (3, 224, 224), batch_size=256)
    check_batch_fits(estimate, available=estimate.total * 2, batch_size=256, precision="32-true")
    with pytest.raises(ConfigError) as raised:
        check_batch_fits(estimate, available=int(estimate.total * 0.3), batch_size=256, precision="32-true")
    message = str(raised.value)
    assert f"{estimate.total / MiB:,.0f} MiB" in message and "batch size 256" in message
    assert "data.batch_size=" in message and "accumulate_grad_batches" in message
    assert "bf16-mixed" in message and "activation_checkpointing" in message


def test_auto_mode_streams_a_dataset_that_would_not_fit(tmp_path):
    import shutil

    from test_training import REPO, compose_train
    from vit.data import DataConfig
    from vit.data.plan import estimated_dataset_bytes, plan_data
    from vit.training import run

    root = tmp_path / "data"
    (root / "mnist5k").mkdir(parents=True)
    shutil.copy(REPO / "data" / "mnist5k" / "mnist5k.npz", root / "mnist5k")
    cfg = DataConfig(name="mnist5k", root=str(root), mode="auto", memory_fraction=0.5)
    assert estimated_dataset_bytes(cfg) == 5000 * 784
    assert plan_data(cfg, available=10 * 5000 * 784) == cfg  # fits: loaded whole
    streamed = plan_data(cfg, available=5000 * 784)  # would take all free memory: shards
    assert streamed.name == "shards" and (tmp_path / "data" / "shards").is_dir()
    assert (Path(streamed.path) / "meta.json").is_file()

    results = run(compose_train(f"data.root={root}", "data.mode=stream", f"output_dir={tmp_path / 'run'}",
                                "model=linear_mnist", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"))
    assert results["dataset"] == "mnist5k" and results["global_step"] == 62  # 4000 // 64: streams drop the last part batch
    assert results["test_acc"] > 0.5


def test_npz_size_is_read_from_the_headers(datasets_root):
    from vit.data import DataConfig
    from vit.data.plan import estimated_dataset_bytes

    cfg = DataConfig(name="cifar10", source="npz", path=str(datasets_root / "cifar10_jpeg_subset.npz"), mode="auto")
    images_and_labels = 20_000 * 32 * 32 * 3 + 20_000 * 8  # x_train + x_test uint8, y_train + y_test int64
    assert images_and_labels <= estimated_dataset_bytes(cfg) <= images_and_labels + 4096  # + the class names
