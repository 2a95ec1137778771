"""Attention you can see: rollout, class-token grids, figures, and visualize.py end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vit
from vit.attention_maps import attention_rollout, cls_attention_grid, normalize_layers, render_attention_figure
from vit.training import run

from test_training import REPO, compose_train, quick

# costly module-scoped fixtures: one worker runs them all, once (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_visualize")


def random_attention(batch: int, heads: int, tokens: int, layers: int) -> list[torch.Tensor]:
    return [torch.randn(batch, heads, tokens, tokens).softmax(dim=-1) for _ in range(layers)]


# -- rollout and grids --------------------------------------------------------------------------------

@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5])
def test_rollout_is_row_stochastic_with_shape_b_t_t(head_fusion, discard_ratio):
    rollout = attention_rollout(random_attention(2, 3, 10, 4), head_fusion, discard_ratio)
    assert rollout.shape == (2, 10, 10) and rollout.dtype == torch.float32
    assert torch.allclose(rollout.sum(dim=-1), torch.ones(2, 10), atol=1e-5)
    assert (rollout >= 0).all()


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    assert torch.allclose(attention_rollout([eye] * 4), torch.eye(5).expand(2, 5, 5))


def test_rollout_multiplies_later_layers_from_the_left():
    first, second = random_attention(1, 2, 6, 2)

    def mixed(attn):  # (A + I) with rows re-normalised, heads averaged
        a = attn.mean(dim=1) + torch.eye(6)
        return a / a.sum(dim=-1, keepdim=True)

    expected = mixed(second) @ mixed(first)
    assert torch.allclose(attention_rollout([first, second]), expected, atol=1e-6)
    assert not torch.allclose(expected, mixed(first) @ mixed(second), atol=1e-4)  # the order matters


def test_rollout_and_grid_refuse_bad_input():
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(random_attention(1, 2, 5, 1), head_fusion="median")
    with pytest.raises(ValueError, match="layer 1 has shape"):
        attention_rollout(random_attention(1, 2, 5, 1) + random_attention(1, 2, 6, 1))
    with pytest.raises(ValueError, match="2x3 patch grid"):
        cls_attention_grid(torch.rand(1, 2, 5, 5), (2, 3))
    with pytest.raises(ValueError, match="valid indices are -2..1"):
        normalize_layers([0, 2], depth=2)
    assert normalize_layers([0, -1, 1], depth=2) == [0, 1]


def test_cls_grid_is_the_class_token_row_over_the_patch_grid():
    attn = random_attention(2, 3, 1 + 2 * 3, 1)[0]  # a 2x3 grid: a transposed layout would show
    grid = cls_attention_grid(attn, (2, 3))
    assert grid.shape == (2, 3, 2, 3)
    assert torch.equal(grid[1, 2, 1, 0], attn[1, 2, 0, 1 + 3])  # row 1, column 0 is patch 3

    model = vit.create_model("vit_mnist", depth=2, num_classes=10).eval()
    maps = model.get_attention_maps(torch.randn(4, 1, 28, 28))
    assert len(maps) == 2 and maps[0].shape == (4, 4, 50, 50)
    assert cls_attention_grid(maps[-1], model.patch_embed.grid_size).shape == (4, 4, 7, 7)


def test_figure_of_an_rgb_image_has_a_panel_per_head(tmp_path):
    model = vit.create_model("vit_mnist", depth=3, num_heads=2, in_chans=3, img_size=(28, 32), num_classes=3)
    image = torch.rand(3, 28, 32)
    maps = model.eval().get_attention_maps(image[None])
    path = render_attention_figure(image, maps, model.patch_embed.grid_size, [0, -1], tmp_path / "f.png",
                                   prediction=("cat", 0.5), head_fusion="max", discard_ratio=0.2)
    with Image.open(path) as figure:
        width, height = figure.size
    assert width >= 2 * 150 and height >= 3 * 150  # input/rollout row + 2 layer rows, 2 heads wide


# -- visualize.py -------------------------------------------------------------------------------------

def tiny_checkpoint(run_dir: Path, *overrides: str) -> str:
    """A real checkpoint in a few seconds: one epoch on 128 embedded digits, no test pass."""
    results = run(compose_train(*quick(run_dir, "data.max_train_samples=128", "trainer.limit_val_batches=2",
                                       "test=false", *overrides)))
    return results["best_checkpoint"]


def tiny_checkpoints(root: Path) -> dict[str, str]:
    """``{"vit_mnist": path, "linear_mnist": path}``: a 2-block ViT and the linear baseline."""
    return {"vit_mnist": tiny_checkpoint(root / "vit", "model=vit_mnist", "model.depth=2"),
            "linear_mnist": tiny_checkpoint(root / "linear", "model=linear_mnist")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return tiny_checkpoints(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("digits")
    digits = np.load(REPO / "data" / "mnist5k" / "mnist5k.npz")
    paths = []
    for i in (0, 4999):
        paths.append(folder / f"digit{i}_label{digits['labels'][i]}.png")
        Image.fromarray(digits["images"][i]).save(paths[-1])
    return paths


def visualize_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "visualize.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_visualize_writes_one_readable_figure_per_image(tmp_path, checkpoints, digit_pngs):
    """From the weights file vit.export writes, read as a checkpoint is (predict.py reads one in
    test_predict's command-line tests; in-process, both files predict alike there)."""
    from vit.export import save_weights
    from vit.inference import load_classifier

    weights = save_weights(load_classifier(checkpoints["vit_mnist"]), tmp_path / "vit.safetensors")
    out = tmp_path / "figures"
    done = visualize_py(f"ckpt_path={weights}", f"images=[{','.join(map(str, digit_pngs))}]",
                        f"out={out}", "layers=[0,-1]", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = [out / f"{p.stem}_attention.png" for p in digit_pngs]
    assert done.stdout.split() == [str(p) for p in expected]
    for path in expected:
        with Image.open(path) as figure:
            assert figure.format == "PNG"
            width, height = figure.size
            pixels = np.asarray(figure.convert("L"), dtype=np.float32)
        # 4 heads wide, 3 rows (input + rollout, layer 0, layer 1) at about 220 px a panel
        assert 4 * 150 <= width <= 4000 and 3 * 150 <= height <= 4000
        assert pixels.std() > 20  # drawn, not a blank canvas
    assert not list(tmp_path.glob("outputs")) and not list(tmp_path.glob(".hydra"))  # no run directory


# -- bad inputs ---------------------------------------------------------------------------------------

def test_out_that_is_a_file_is_refused_before_any_figure(tmp_path, digit_pngs):
    from test_predict import tiny_classifier

    from vit.attention_maps import write_attention_figures
    from vit.errors import ConfigError

    kept = tmp_path / "figures"
    kept.write_text("someone's notes")
    with pytest.raises(ConfigError, match=r"out=.*figures is a file; out names the folder"):
        write_attention_figures(tiny_classifier(), digit_pngs, kept)
    assert kept.read_text() == "someone's notes" and sorted(p.name for p in tmp_path.iterdir()) == ["figures"]


@pytest.mark.slow  # a subprocess: importing torch and lightning alone takes seconds
def test_cli_out_that_is_a_file_is_one_message(tmp_path, digit_pngs):
    from test_predict import tiny_classifier

    from vit.export import save_weights

    weights = save_weights(tiny_classifier(), tmp_path / "tiny.safetensors")
    (tmp_path / "figures").write_text("someone's notes")
    done = visualize_py(f"ckpt_path={weights}", f"images=[{digit_pngs[0]}]", f"out={tmp_path / 'figures'}",
                        cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: out={tmp_path / 'figures'} is a file; out names the folder that receives one "
        f"<image stem>_attention.png per image: give a folder path"]
