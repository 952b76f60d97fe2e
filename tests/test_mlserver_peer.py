"""The MLServer peer's settings and its place in the code. MLServer lives in a venv of its own
(``make mlserver-peer``), so these read what the project's venv can: the settings files
``mlserver start`` reads, and the runtime's source that MLServer imports."""

import ast
import json
from pathlib import Path

from bench.server import mlserver_settings
from sota_serve.package.card import ModelCard
from tests.helpers import card_dict, python_sources

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "bench" / "mlserver_peer.py"


def test_the_settings_switch_on_grpc_and_adaptive_batching_for_the_package(tmp_path):
    package = tmp_path / "package"
    package.mkdir()
    ModelCard.parse(card_dict()).save(package / "card.json")
    card = ModelCard.load(package / "card.json")
    folder = tmp_path / "mlserver"
    folder.mkdir()
    returned = mlserver_settings(folder, package, http_port=8100, grpc_port=8101, metrics_port=8102, workers=2,
                                 threads=1, max_batch_size=32, max_batch_time=0.01)
    written = {name: json.loads((folder / name).read_text()) for name in ("settings.json", "model-settings.json")}
    assert written == returned
    server, model = written["settings.json"], written["model-settings.json"]
    assert (server["http_port"], server["grpc_port"], server["metrics_port"]) == (8100, 8101, 8102)
    assert server["parallel_workers"] == 2 and server["model_repository_root"] == str(folder)
    assert Path(server["metrics_dir"]).parent == folder  # not the directory MLServer starts in
    assert server["logging_settings"]["loggers"]["uvicorn.access"]["level"] == "WARNING"
    assert (model["max_batch_size"], model["max_batch_time"]) == (32, 0.01)
    assert model["name"] == card.name and model["parameters"]["version"] == card.version
    assert model["parameters"]["uri"] == str(package.resolve())
    assert model["parameters"]["extra"] == {"precision": "auto", "threads": 1}
    assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, card.num_classes]}]


def test_the_implementation_named_is_a_runtime_in_the_peer_module(tmp_path):
    package = tmp_path / "package"
    package.mkdir()
    ModelCard.parse(card_dict()).save(package / "card.json")
    model = mlserver_settings(tmp_path, package, http_port=1, grpc_port=2, metrics_port=3)["model-settings.json"]
    module, _, name = model["implementation"].rpartition(".")
    assert ROOT / Path(*module.split(".")).with_suffix(".py") == PEER
    classes = {node.name: node for node in ast.parse(PEER.read_text()).body if isinstance(node, ast.ClassDef)}
    runtime = classes[name]
    assert [ast.unparse(base) for base in runtime.bases] == ["MLModel"]
    assert {f.name for f in runtime.body if isinstance(f, ast.AsyncFunctionDef)} >= {"load", "predict"}


def test_only_the_peer_module_imports_mlserver():
    """The project's venv has no MLServer: any module it imports must do without it."""
    importers = []
    for path in python_sources("sota_serve", "bento", "rayserve", "training", "bench", "dev", "tests"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            if any(n.split(".")[0] == "mlserver" for n in names):
                importers.append(path.relative_to(ROOT).as_posix())
    assert sorted(set(importers)) == ["bench/mlserver_peer.py"]
