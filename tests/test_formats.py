"""The format registry: one module per artifact format, and nothing else branches on a format's name."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from sota_serve import formats
from sota_serve.errors import RuntimeBackendError
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import draft_package, open_package
from tests.helpers import card_dict, python_sources, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]


def test_registry_names_files_and_platforms():
    assert formats.NAMES[0] == formats.DEFAULT == "onnx"
    for name, fmt in formats.REGISTRY.items():
        assert fmt.name == name and fmt.platform and fmt.suffixes
        assert formats.for_file(Path(f"x/{fmt.file_name}")) is fmt
    assert formats.for_file(Path("weights.safetensors")) is None
    with pytest.raises(RuntimeBackendError, match="unknown backend 'tensorrt'; use one of onnx, pt2, torchscript"):
        formats.get("tensorrt")


def test_each_format_embeds_the_serving_part(tiny_package):
    card = open_package(tiny_package).card
    for fmt in formats.REGISTRY.values():
        embedded = json.loads(fmt.read_card(tiny_package / fmt.file_name))
        assert embedded == json.loads(card.serving_json()), fmt.name
        assert "export" not in embedded and "artifacts" not in embedded


def test_artifact_hashes_do_not_depend_on_the_records(tmp_path):
    """Recording other measurements leaves the model files' bytes alone; the serving part
    (here the default TTA policy) is embedded, so changing it changes them."""
    from sota_serve.building.export import export_graphs, write_package

    card = ModelCard.parse(card_dict())
    graphs = export_graphs(tiny_cnn(), card, tmp_path)

    def hashes() -> dict[str, str]:
        return {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in graphs.files.items()}

    first = write_package(tmp_path, card.with_updates(export=graphs.record, metrics={"accuracy": 0.5}), graphs.files)
    before = hashes()
    second = write_package(tmp_path, card.with_updates(
        export=graphs.record, metrics={"accuracy": 0.9, "valid_count": 10},
        parity={"images": 10, "top1_agreement": 1.0, "max_abs_diff": 1e-7}), graphs.files)
    assert hashes() == before
    assert {n: a.sha256 for n, a in first.artifacts.items()} == {n: a.sha256 for n, a in second.artifacts.items()}
    assert open_package(tmp_path).card.metrics.accuracy == 0.9  # card.json has the new records, and verifies
    write_package(tmp_path, card.with_updates(tta={**card.tta.model_dump(), "default": "five_crop"}), graphs.files)
    changed = hashes()
    assert all(changed[n] != before[n] for n in before)


def test_a_draft_package_runs_before_its_card_is_written(tmp_path, photos):
    from sota_serve.building.export import export_graphs
    from sota_serve.classifier import Classifier

    card = ModelCard.parse(card_dict())
    graphs = export_graphs(tiny_cnn(), card, tmp_path, formats=("onnx",))
    assert not (tmp_path / "card.json").exists()
    clf = Classifier.from_package(draft_package(card, graphs.files, tmp_path), device="cpu")
    probs = clf.probabilities([p.read_bytes() for p in photos], "five_crop")
    assert probs.shape == (len(photos), 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert not clf.package.verified


#: A comparison with a format's name, or a mapping keyed by one: the branches the registry replaces.
_BRANCH = re.compile(r"""(==|!=)\s*["'](onnx|pt2|torchscript)["']|["'](onnx|pt2|torchscript)["']\s*(==|!=|in\b|not in\b)"""
                     r"""|[{,]\s*["'](onnx|pt2|torchscript)["']\s*:""")


def test_only_the_format_modules_branch_on_a_format_name():
    hits = []
    for room in ("sota_serve", "training", "bento", "bench"):
        for path in python_sources(room):
            if path.parent.name == "formats":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if _BRANCH.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "use sota_serve.formats instead:\n" + "\n".join(hits)
