"""What a ViT attends to: ``python visualize.py ckpt_path=RUN/checkpoints/last.ckpt images=[a.png,b.jpg] out=DIR``
writes ``DIR/<image stem>_attention.png`` per image: the class-token attention of every head at
the chosen ``layers`` and the attention rollout, over the image. ``ckpt_path`` may also be a
``.safetensors`` file written by ``vit.export``. A thin Hydra entry point over ``vit.inference``
and ``vit.attention_maps``."""
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

from vit.attention_maps import check_out_dir, write_attention_figures
from vit.errors import UserError
from vit.inference import load_classifier, require_keys
from vit.predict import expand_image_paths

USAGE = "python visualize.py ckpt_path=CHECKPOINT images=[a.png,photos/] [out=DIR] [layers=[0,-1]]"


def _as_list(value: Any) -> list:
    """``images=a.png`` and ``layers=0`` mean one-element lists, not characters or an error."""
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


@hydra.main(version_base="1.3", config_path="conf", config_name="visualize")
def main(cfg: DictConfig) -> None:
    try:
        # the cheap checks first, so that a typo costs no model loading
        require_keys(cfg, USAGE, "ckpt_path", "images", "out")
        check_out_dir(cfg.out)
        paths = expand_image_paths(_as_list(cfg.images))
        module = load_classifier(cfg.ckpt_path)
        written = write_attention_figures(module, paths, cfg.out, _as_list(cfg.layers), cfg.head_fusion,
                                          cfg.discard_ratio)
    except (UserError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
