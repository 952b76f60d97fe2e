"""Recipe in, model package out: train, evaluate, export, check parity, write the card."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

from sota_serve import formats
from sota_serve.building.agreement import measure
from sota_serve.building.calibration import CALIBRATION_IMAGES, crops, sample
from sota_serve.building.export import export_graphs, write_package
from sota_serve.classifier import Classifier
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import (
    DatasetRecord,
    Metrics,
    ModelCard,
    TrainingRecord,
    classifier_card,
)
from sota_serve.package.loading import draft_package
from sota_serve.progress import step
from training.datasets import ImageFolder, resolve_dataset
from training.evaluate import (
    MIN_PARITY,
    ParityError,
    calibrate_ood,
    evaluate_tta,
    fastai_eval,
    package_probs,
    parity,
)
from training.quiet import quiet_export
from training.recipe import Recipe
from training.report import confusion_matrix_plot, lr_find_plot, training_curve
from training.staging import check_destination, staged
from training.stats import recipe_stats
from training.train import TrainResult, export_model, train
from training.weights import SourceWeights, WeightsError, read_weights

log = logging.getLogger("sota_serve.training")

#: Validation images preprocessed into the export check (plus random pixels).
_EXPORT_CHECK_IMAGES = 16


def base_card(recipe: Recipe, folder: ImageFolder, mean, std, five_crop_edge: int) -> ModelCard:
    return classifier_card(
        name=recipe.name, labels=list(folder.labels), size=recipe.final_size,
        resize_edge=recipe.resize_edge, mean=mean, std=std, tta_edge=five_crop_edge,
        architecture=recipe.arch, license=recipe.license,
    )


def _versions() -> dict[str, str]:
    import fastai
    import torch

    return {"python": platform.python_version(), "fastai": fastai.__version__,
            "torch": torch.__version__.split("+")[0]}


def train_package(recipe: Recipe, out_dir: str | Path) -> ModelCard:
    """Train, evaluate and export ``recipe`` into the package ``out_dir``, which is written
    whole or not at all (:func:`training.staging.staged`)."""
    out = check_destination(out_dir)
    folder = resolve_dataset(recipe.data)
    train_files, valid_files = folder.files("train"), folder.files("valid")
    log.info("dataset %s: %d train, %d valid images, %d classes", folder.name,
             len(train_files), len(valid_files), len(folder.classes))
    weights = read_weights(recipe.weights) if recipe.weights else None
    recipe = _resolve_normalization(recipe, weights)
    if recipe.normalization == "weights":
        mean, std = weights.normalization.mean, weights.normalization.std  # type: ignore[union-attr]
    else:
        mean, std = recipe_stats(recipe.normalization, folder, size=recipe.final_size,
                                 edge=recipe.resize_edge, sample=recipe.stats_sample, seed=recipe.seed)
    result = train(recipe, folder, mean, std, weights)
    log.info("trained in %.1fs on %s; evaluating", result.seconds, result.device)
    with staged(out) as staging:
        card = _evaluate_and_write(recipe, folder, weights, result, mean, std, staging, out)
    if card.parity.top1_agreement < MIN_PARITY:
        raise ParityError(
            f"the package agrees with fastai on only {100 * card.parity.top1_agreement:.2f}% of"
            f" validation images (need {100 * MIN_PARITY:.0f}%); it was written to {out} for"
            " inspection but must not be served"
        )
    return card


def _evaluate_and_write(recipe: Recipe, folder: ImageFolder, weights: SourceWeights | None,
                        result: TrainResult, mean, std, out: Path, destination: Path) -> ModelCard:
    """Everything after training, written into ``out``; ``destination`` is where it goes."""
    train_files = folder.files("train")
    step(f"fastai evaluation on {len(result.learn.dls.valid.items)} validation images")
    fa = fastai_eval(result.learn)
    valid_items = [Path(p) for p in result.learn.dls.valid.items]  # the order of get_preds

    edges = sorted({round(recipe.final_size / r) for r in recipe.five_crop_ratios})
    card = base_card(recipe, folder, mean, std, edges[0])
    pre = Preprocessor.from_card(card)
    check = crops(pre, valid_items[:_EXPORT_CHECK_IMAGES])
    # int8 ranges from a seeded sample of the training images
    calibration = (crops(pre, sample(train_files, CALIBRATION_IMAGES, seed=recipe.seed))
                   if recipe.int8 else None)
    with quiet_export():
        graphs = export_graphs(export_model(result.learn), card, out, check_inputs=check, fp16=recipe.fp16,
                               int8=recipe.int8, calibration=calibration)

    # Evaluate the exported files before their card is final: the TTA edges, the default
    # policy and the OOD fit measured here are part of what the files embed.
    draft = draft_package(card, graphs.files, out)
    clf = Classifier.from_package(draft, backend=formats.DEFAULT, device="cpu", precision="fp32")
    served = package_probs(clf, valid_items, "none", "package eval")
    agreement = parity(fa.probs, served, formats.DEFAULT)
    tta = evaluate_tta(clf, valid_items, fa.targets, served, flip_edge=recipe.resize_edge, edges=edges)
    ood = calibrate_ood(clf.preprocessor, train_files, valid_items, list(clf.preprocessor.policies),
                        seed=recipe.seed)
    plain_acc = float((served.argmax(1) == fa.targets).mean())
    # the plain fp32 ONNX probabilities above were computed on the CPU: reused when training ran there
    known = {formats.DEFAULT: served} if result.device == "cpu" else None
    half = (measure(draft, valid_items, "fp16", device=result.device, source="validation", known=known)
            if recipe.fp16 else None)
    # int8 serves on CPUs: measured there, against the fp32 CPU probabilities above
    int8 = (measure(draft, valid_items, "int8", device="cpu", source="validation",
                    known={formats.DEFAULT: served}) if recipe.int8 else None)

    step(f"write the package to {destination}")
    figures = {
        "training_curve": training_curve(result.history, out / "training_curve.png").name,
        "confusion_matrix": confusion_matrix_plot(
            fa.targets, served.argmax(1), card.labels, out / "confusion_matrix.png").name,
    }
    if result.lr_finds:
        figures["lr_find"] = lr_find_plot(result.lr_finds, out / "lr_find.png").name
    return write_package(out, card.with_updates(
        tta=tta.card_tta(),
        ood=ood,
        export=graphs.record,
        metrics=Metrics(
            accuracy=plain_acc,
            accuracy_fastai_pipeline=fa.accuracy,
            **tta.metrics(),
            five_crop_resize=tta.edges["five_crop"],
            five_crop_by_resize={str(k): v for k, v in tta.searched["five_crop"].items()},
            accuracy_fastai_tta=fa.tta_accuracy,
            valid_loss=fa.loss,
            valid_count=len(valid_items),
            train_count=len(train_files),
            image_size=recipe.final_size,
        ),
        training=TrainingRecord(
            recipe=recipe.model_dump(mode="json"),
            history=result.history,
            seconds=round(result.seconds, 1),
            device=result.device,
            versions=_versions(),
            dataset=_dataset_record(folder, len(train_files), len(valid_items)),
            weights=weights.record() if weights else None,
            transfer=result.transfer,
            schedule=result.schedule,
            lr_find=[f.record() for f in result.lr_finds] or None,
        ),
        parity=agreement,
        fp16=half,
        int8=int8,
        figures=figures,
        intended_use=f"Classify images like those of {folder.name} into {len(card.labels)} classes.",
        limitations=(
            f"Trained {'from ' + weights.file if weights else 'from scratch'} on {len(train_files)} images; accuracy is measured on"
            f" {len(valid_items)} held-out images of the same source and will be lower on other"
            " kinds of images. Every input gets one of the labels: there is no reject class, but"
            " each answer carries an out-of-distribution check (`ood`) that flags inputs whose"
            " pixel statistics are unlike the training images'."
        ),
    ), graphs.files)


def _resolve_normalization(recipe: Recipe, weights: SourceWeights | None) -> Recipe:
    """Weights that say which stats they were trained with keep them, unless the recipe names
    other stats; ``weights`` stats need such weights."""
    says = weights is not None and weights.normalization is not None
    if says and "normalization" not in recipe.model_fields_set:
        return recipe.model_copy(update={"normalization": "weights"})
    if recipe.normalization == "weights" and not says:
        raise WeightsError("normalization 'weights' needs weights that record their stats (a sota-serve"
                           " package); for a plain checkpoint choose imagenet or dataset")
    return recipe


def _dataset_record(folder: ImageFolder, n_train: int, n_valid: int) -> DatasetRecord:
    return DatasetRecord(name=folder.name, classes=len(folder.classes), train=n_train,
                         valid=n_valid, fingerprint=folder.fingerprint())
