"""Train and test a model: ``python train.py [model=...] [data=...] [trainer=...] [key=value ...]``.

A thin Hydra entry point; the run itself is ``vit.training.run``. See README.md.
"""
import sys

import hydra
from omegaconf import DictConfig

from vit.config import register_configs
from vit.errors import UserError
from vit.training import run

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except UserError as error:  # the message names the bad value; a traceback would only hide it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return results.get("test_acc")  # lets sweepers optimise on it


if __name__ == "__main__":
    main()
