"""Top-k classes of images: ``python predict.py ckpt_path=RUN/checkpoints/last.ckpt images=[a.png,b.jpg]``
(a folder works too: ``images=[photos/]``; ``ckpt_path`` may also be a ``.safetensors`` file written
by ``vit.export``). A thin Hydra entry point over ``vit.inference`` and ``vit.predict``."""
import sys

import hydra
from omegaconf import DictConfig

from vit.errors import UserError
from vit.predict import expand_image_paths, predict_files
from vit.inference import load_classifier


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        module = load_classifier(cfg.ckpt_path)
        ranked_per_image = predict_files(module, expand_image_paths(cfg.images), cfg.top_k, cfg.batch_size)
    except (UserError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for path, ranked in ranked_per_image:
        print(f"{path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in ranked))


if __name__ == "__main__":
    main()
