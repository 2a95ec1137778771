"""Train and test a model: ``python train.py [model=...] [data=...] [trainer=...] [key=value ...]``.

A thin Hydra entry point; the run itself is ``vit.training.run``. See README.md.
A mistake in the config stops the run with one message and exit status 2; in a sweep (``-m``)
it stops only its own job, and the sweep lists the failed jobs at its end (``vit.sweep``).
"""
import sys

import hydra
from omegaconf import DictConfig

from vit import sweep
from vit.config import register_configs
from vit.errors import UserError
from vit.training import run

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    multirun = sweep.in_multirun()
    if multirun:
        sweep.clear_failure()
    try:
        results = run(cfg)
    except UserError as error:  # the message names the bad value; a traceback would only hide it
        if multirun:
            sweep.record_failure(error)
            return None
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return results.get("test_acc")  # lets sweepers optimise on it


if __name__ == "__main__":
    main()
