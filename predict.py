"""Top-k classes of images: ``python predict.py ckpt_path=RUN/checkpoints/last.ckpt images=[a.png,b.jpg]``
(a folder works too: ``images=[photos/]``; ``ckpt_path`` may also be a ``.safetensors`` file written
by ``vit.export``). ``out=preds.csv`` or ``out=preds.json`` also writes the predictions to a file
(see conf/predict.yaml). Files that are not readable images are skipped and reported, or stop the
run with ``bad_image_policy=fail``. A thin Hydra entry point over ``vit.inference`` and ``vit.predict``."""
import sys

import hydra
from omegaconf import DictConfig

from vit.data.errors import DataError
from vit.errors import UserError
from vit.inference import load_classifier, require_keys
from vit.predict import check_options, expand_image_paths, output_file, predict_files, write_predictions

USAGE = "python predict.py ckpt_path=CHECKPOINT images=[a.png,photos/] [top_k=5] [out=preds.csv]"


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        # every option is checked before the model is loaded: a typo costs no waiting
        require_keys(cfg, USAGE, "ckpt_path", "images")
        check_options(cfg.top_k, cfg.batch_size, cfg.bad_image_policy)
        output = output_file(cfg.out, cfg.format, cfg.overwrite)
        paths = expand_image_paths(cfg.images)
        module = load_classifier(cfg.ckpt_path)
        predictions = predict_files(module, paths, cfg.top_k, cfg.batch_size, cfg.bad_image_policy)
        for path, reason in predictions.skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        if not predictions.ranked:
            raise DataError(f"none of the {len(paths)} image file(s) could be read")
        if output is not None:
            write_predictions(predictions, *output)
    except (UserError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for path, ranked in predictions.ranked:
        print(f"{path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in ranked))
    if output is not None:
        print(f"wrote {len(predictions.ranked)} prediction(s) to {output[0]}", file=sys.stderr)


if __name__ == "__main__":
    main()
