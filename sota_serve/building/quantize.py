"""``sota-serve quantize``: add an int8 file to a package that has none (packages exported
before int8 existed, or with ``--no-int8``), without torch and without retraining.

The images given are split, seeded: up to 256 set the activation ranges, up to 256 others
measure the int8 file's agreement with fp32 (the card's ``int8`` record, source
``held-out calibration``). An ensemble's combined file is quantized like any other, with the
first and last layer of each member kept in fp32. The existing files are left byte for byte as they are;
the new file gets the same embedded serving card, its sha256 goes into ``card.json``, and
the package README is rendered again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sota_serve import formats
from sota_serve.building import calibration
from sota_serve.building.agreement import measure
from sota_serve.building.model_readme import render_readme
from sota_serve.constants import CARD_FILE, README_FILE
from sota_serve.errors import PackageError
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package import precision
from sota_serve.package.card import ArtifactSpec, ExportRecord, ModelCard
from sota_serve.package.loading import draft_package, open_package, sha256_file
from sota_serve.progress import step


class Int8ExistsError(PackageError):
    """The package has an int8 file already and replacing it was not asked for; ``how`` says
    how to ask, in the words of the caller (a keyword here, a flag on the command line)."""

    def __init__(self, package: str | Path, files: Sequence[str], how: str = "pass overwrite=True") -> None:
        self.package, self.files = str(package), list(files)
        super().__init__(f"{package}: already has {', '.join(files)}, kept as it is; {how} to calibrate it"
                         " again on these images")

    def told(self, package: str | Path, how: str) -> Int8ExistsError:
        """The same refusal about ``package`` as the caller named it, asked for with ``how``."""
        return Int8ExistsError(package, self.files, how)


#: Fewer images than twice this, and the agreement is measured on all of them, the
#: calibration images included (too few to hold any out).
MIN_HELD_OUT = 20


def _split(files: Sequence[Path], seed: int) -> tuple[list[Path], list[Path], str]:
    """(calibration files, agreement files, the agreement's source)."""
    shuffled = calibration.sample(files, len(files), seed=seed)
    if len(files) < 2 * MIN_HELD_OUT:
        return shuffled[: calibration.CALIBRATION_IMAGES], shuffled, "calibration"
    half = min(calibration.CALIBRATION_IMAGES, len(files) // 2)
    return shuffled[:half], shuffled[half: half + calibration.CALIBRATION_IMAGES], "held-out calibration"


def add_int8(package_dir: str | Path, images: Sequence[Path], *, seed: int = 0,
             check_images: Sequence[Path] | None = None, overwrite: bool = False) -> ModelCard:
    """Quantize each fp32 file of the package whose format has int8; returns the new card.

    ``check_images``: measure the agreement on these (a validation set, source
    ``validation``) and calibrate on a seeded sample of ``images``; without them ``images``
    are split in two as the module says. A package that already has an int8 file keeps it
    (:class:`Int8ExistsError`) unless ``overwrite``."""
    package = open_package(package_dir)  # every existing file's sha256 is checked first
    if package.root is None:
        raise PackageError(f"{package_dir}: quantize a package directory, not a lone file")
    root, card = package.root, package.card
    targets = [f for f in package.backends
               if "int8" in formats.get(f).precisions and precision.REFERENCE in package.precisions(f)]
    if not targets:
        raise PackageError(f"{package_dir}: no fp32 file of a format with int8 ({', '.join(package.artifacts)})")
    existing = [package.artifacts[k].name for k in (precision.artifact_key(f, "int8") for f in targets)
                if k in package.artifacts]
    if existing and not overwrite:
        raise Int8ExistsError(package_dir, existing)
    if check_images:
        calib_files = calibration.sample(images, calibration.CALIBRATION_IMAGES, seed=seed)
        check_files, source = list(check_images), "validation"
    else:
        calib_files, check_files, source = _split(images, seed)
    pre = Preprocessor.from_card(card)
    batches = calibration.batches(calibration.crops(pre, calib_files))

    new: dict[str, Path] = {}
    notes: dict[str, object] = {}
    embedded = card.serving_json()
    for name in targets:
        fmt = formats.get(name)
        new[precision.artifact_key(name, "int8")] = path = root / precision.file_name(name, "int8")
        step(f"int8 calibration: {name} on {len(calib_files)} images")
        notes |= fmt.quantize(package.artifacts[name], batches, path)
        fmt.embed_card(path, embedded)

    draft = draft_package(card, {**package.artifacts, **new}, root)
    record = measure(draft, check_files, "int8", device="cpu", source=source)

    artifacts = {**card.artifacts, **{k: ArtifactSpec(path=p.name, sha256=sha256_file(p)) for k, p in new.items()}}
    export = card.export or ExportRecord(formats=list(package.backends))
    written = sorted({precision.split_key(k)[1] for k in artifacts}, key=precision.PRECISIONS.index)
    final = ModelCard.parse(card.model_copy(update={
        "artifacts": artifacts, "int8": record,
        "export": export.model_copy(update={"precisions": written, **notes}),
    }).to_dict())
    final.save(root / CARD_FILE)
    (root / README_FILE).write_text(render_readme(final), encoding="utf-8")
    return final
