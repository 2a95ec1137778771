"""Reading a distillation teacher: which checkpoint (``distill.teacher_ckpt``, a path or
``latest:MODEL``), loaded without unpickling code, checked against the student's data, and
wrapped as a frozen :class:`vit.distill.Teacher`. Kept apart from the losses in
:mod:`vit.distill` because reading a classifier needs :mod:`vit.inference`, which needs the
LightningModule that uses those losses.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from vit.distill import LATEST, Teacher
from vit.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def load_teacher(path: str | Path, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """The frozen teacher: a classifier this package trained, with its normalisation inside.

    Takes the student's data, images normalised with the student's statistics, so the teacher
    gets them back in [0, 1] first (see :class:`Teacher`). Refuses, naming both, a teacher made
    for another number of classes or another image shape. Loading never unpickles code.
    """
    return teacher_for(read_teacher(path), path, num_classes, input_shape)


def read_teacher(path: str | Path) -> Any:
    """The classifier (an ``ImageClassifier``, eval mode) stored in ``path``: a checkpoint or a
    safetensors export. A missing, damaged or unsafe file (one that would unpickle code) raises
    CheckpointError naming ``distill.teacher_ckpt``."""
    from vit.inference import load_classifier

    try:
        return load_classifier(path)
    except CheckpointError as error:
        raise CheckpointError(f"distill.teacher_ckpt={path}: {error}") from error


def teacher_for(classifier: Any, path: str | Path, num_classes: int, input_shape: tuple[int, int, int],
                class_names: Sequence[str] | None = None) -> "Teacher":
    """``classifier`` (from :func:`read_teacher`) as a frozen :class:`Teacher` for a student with
    ``num_classes`` classes of images ``input_shape`` (C, H, W). Refuses a teacher trained for
    another class count or image shape, naming both, and, when ``class_names`` are given, one whose
    classes have other names (a digits teacher for garments has ten classes too)."""
    from vit.registry import get_model_spec

    hp = classifier.hparams
    arguments = {**get_model_spec(hp.model_name).arguments(), **hp.model_kwargs}  # the registry's defaults too
    teacher_classes = len(hp.class_names) if hp.get("class_names") else arguments.get("num_classes")
    size = arguments.get("img_size", input_shape[1:])
    teacher_shape = (int(arguments.get("in_chans", input_shape[0])),
                     *((size, size) if isinstance(size, int) else tuple(int(s) for s in size)))
    if teacher_classes != num_classes or teacher_shape != tuple(input_shape):
        raise ConfigError(f"distill.teacher_ckpt={path} was trained for {teacher_classes} classes on images "
                          f"{teacher_shape}, but the student has {num_classes} classes and images "
                          f"{tuple(input_shape)}; train a teacher on the same data")
    if class_names is not None and hp.get("class_names"):
        differ = [(i, t, s) for i, (t, s) in enumerate(zip(hp.class_names, class_names)) if str(t) != str(s)]
        if differ:
            i, theirs, ours = differ[0]
            raise ConfigError(f"distill.teacher_ckpt={path} was trained on other classes: class {i} is {theirs!r} "
                              f"for the teacher but {ours!r} in the student's data; train a teacher on the same "
                              f"data")
    return Teacher(classifier.model, hp.mean, hp.std)


def teacher_for_data(classifier: Any, path: str | Path, dm: Any) -> "Teacher":
    """:func:`teacher_for` the data module ``dm`` (set up): its classes and image shape, and its
    normalisation, which the student's batches carry and the teacher undoes."""
    teacher = teacher_for(classifier, path, dm.num_classes, (dm.in_chans, *dm.img_size), list(dm.class_names))
    teacher.set_student_normalisation(list(dm.mean), list(dm.std))
    return teacher


def resolve_teacher_ckpt(teacher_ckpt: str, output_dir: Path, dataset: str) -> Path:
    """``distill.teacher_ckpt`` as a path. A path stays that path; ``latest:MODEL`` becomes the best
    checkpoint of the newest finished run of MODEL on ``dataset`` among the folders beside
    ``output_dir``: in a sweep, an earlier job of the same sweep (Hydra runs a sweep's jobs in the
    order given), else an earlier run under the same parent (outputs/runs/). A folder counts when
    its ``.hydra/config.yaml`` names that model.name and data.name and its ``results.json`` says the
    run finished. The log says which was taken; CheckpointError when there is none."""
    from vit.checkpoints import sibling_runs

    if not teacher_ckpt.startswith(LATEST):
        return Path(teacher_ckpt)
    model = teacher_ckpt[len(LATEST):]
    here = output_dir.resolve()
    found = []
    for run_dir in sibling_runs(output_dir, model, dataset):
        try:
            results = json.loads((run_dir / "results.json").read_text())
        except (OSError, ValueError):
            continue
        best = results.get("best_checkpoint")
        # The folder's own copy: the path written in results.json breaks when run folders are moved.
        checkpoint = run_dir / "checkpoints" / Path(best).name if best else None
        if not results.get("interrupted") and checkpoint is not None and checkpoint.is_file():
            found.append(checkpoint)
    if not found:
        raise CheckpointError(
            f"distill.teacher_ckpt={teacher_ckpt}: no folder beside this run (under {here.parent}) holds a finished "
            f"{model} run on data {dataset!r} with a best checkpoint. Train the teacher first (in a sweep: list "
            f"its job before this one), or pass distill.teacher_ckpt=PATH to its checkpoints/*.ckpt")
    newest = max(found, key=lambda path: path.stat().st_mtime)
    log.info("distill.teacher_ckpt=%s: the newest finished %s run on %s beside this one: %s",
             teacher_ckpt, model, dataset, newest)
    return newest
