"""Several models in one server: the repository's layouts, each model's own costs in admission,
versions swapped in while requests run (in process on real ONNX Runtime pipelines, and under a
real `bentoml serve` with 64 closed-loop clients), a version that fails to verify, the memory
bound, and the routes of every model over HTTP and gRPC."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.server import Server, free_port
from sota_serve.errors import ModelLoadError, ModelNotFoundError, PackageError
from sota_serve.package.loading import open_package
from sota_serve.package.repository import scan, version_key
from sota_serve.serving.admission import Admission, Ticket
from sota_serve.serving.batcher import Ewma
from sota_serve.serving.models import Models
from sota_serve.serving.pipeline import Pipeline, Pools
from sota_serve.serving.settings import Settings
from tests.helpers import tampered_copy

#: the admission bound the swap test holds every answer to (SOTA_SERVE_MAX_WAIT_S)
MAX_WAIT_S = 10.0


def _version(package: Path, into: Path, version: str, **card: str) -> Path:
    """A copy of ``package`` as ``version`` (the card says so, and whatever else ``card`` gives;
    its files and hashes are the same)."""
    shutil.copytree(package, into)
    data = json.loads((into / "card.json").read_text())
    data.update(version=version, **card)
    (into / "card.json").write_text(json.dumps(data))
    return into


@pytest.fixture
def repository(tmp_path, tiny_package, tiny_cnn_at) -> Path:
    """``digits/1``, ``digits/2`` (the 32 px model) and ``wide/`` (the 64 px one), plus what a
    repository may also hold: a file, a hidden folder, a version still being copied (no card)."""
    root = tmp_path / "models"
    _version(tiny_package, root / "digits" / "1", "1")
    _version(tiny_package, root / "digits" / "2", "2")
    (root / "digits" / "3-partial").mkdir()
    _version(tiny_cnn_at(64), root / "wide", "7")
    (root / "README.txt").write_text("not a model")
    (root / ".trash").mkdir()
    return root


# --- the repository's layouts ---------------------------------------------------------------

def test_a_repository_serves_each_folders_latest_version(repository):
    entries = scan(str(repository))
    assert [(e.name, e.version) for e in entries] == [("digits", "2"), ("wide", "7")]  # wide/: its card's
    _version(Path(entries[0].source), repository / "digits" / "10", "10")
    assert scan(str(repository))[0].version == "10"  # 10 is after 2, as people count
    assert sorted(["1.10", "1.9", "2", "1.2.3"], key=version_key) == ["1.2.3", "1.9", "1.10", "2"]


def test_a_list_names_each_package_by_its_card_and_refuses_two_of_one_name(tiny_package, tmp_path):
    other = _version(tiny_package, tmp_path / "other", "3", name="other-cnn")
    entries = scan(f"{tiny_package}, {other}")
    assert [(e.name, e.version, e.source) for e in entries] == [("tiny-cnn", "1", str(tiny_package)),
                                                                 ("other-cnn", "3", str(other))]
    with pytest.raises(PackageError, match="two models are named 'tiny-cnn'"):
        scan(f"{tiny_package},{_version(tiny_package, tmp_path / 'again', '9')}")
    with pytest.raises(PackageError, match="no such package"):
        scan(f"{tiny_package},{tmp_path / 'missing'}")


def test_a_repository_without_a_package_or_with_a_bad_name_is_refused_in_one_line(tmp_path, tiny_package):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(PackageError, match="no card.json here and no model package in its subfolders"):
        scan(str(tmp_path / "empty"))
    _version(tiny_package, tmp_path / "bad" / "two words", "1")
    with pytest.raises(PackageError, match="cannot name a model"):
        scan(str(tmp_path / "bad"))


# --- admission: each model at its own cost ---------------------------------------------------

def test_admission_charges_each_models_crops_at_that_models_cost():
    adm = Admission(max_wait_s=10, max_in_flight=100, decode_threads=1, seconds_per_crop=Ewma(initial=0.001))
    costly = adm.model_cost("xresnet50")
    costly.seconds_per_crop.add(0.1)
    cheap_ticket, costly_ticket = Ticket(), Ticket()
    adm.charge(cheap_ticket, 100)
    assert adm.drain_s() == pytest.approx(0.1)  # 100 crops at 1 ms
    adm.charge(costly_ticket, 10, costly)
    assert adm.drain_s() == pytest.approx(0.1 + 1.0)  # and 10 at 100 ms, not 110 at one average
    assert adm.ready_s(5, cost=costly) == pytest.approx(1.1 + 0.5)  # its own 5 crops at its own cost
    assert adm.ready_s(5) == pytest.approx(1.1 + 0.005)
    adm.leave(costly_ticket)
    assert (costly.pending, adm.pending_crops) == (0, 100)
    adm.forget(costly)
    assert adm.costs == [adm.cost]


# --- versions swapped in process --------------------------------------------------------------

def _models(source: Path, **kwargs) -> tuple[Models, Admission]:
    settings = Settings(model=str(source), device="cpu", max_batch_size=8, max_batch_size_tta=2, model_threads=1,
                        threads=1, decode_threads=2)
    plan = settings.plan()
    admission = Admission(max_wait_s=MAX_WAIT_S, max_in_flight=64, decode_threads=2)
    pools = Pools.of(plan)

    def build(entry, cost):
        return Pipeline.build(open_package(entry.source), settings, plan, admission, cost=cost, pools=pools)

    return Models(build, admission, source=str(source), **kwargs), admission


def test_a_new_version_takes_new_requests_while_the_old_one_finishes_its_own(repository, photos):
    image = photos[0].read_bytes()

    async def main():
        models, admission = _models(repository, explicit=True)
        models.load_all(scan(str(repository)))
        assert models.names() == ("digits", "wide") and models.get("digits").version == "2"
        with models.use("digits") as old:
            _version(Path(old.entry.source), repository / "digits" / "3", "3")
            new = await models.load("digits")  # loaded and warmed up on a thread, then swapped in
            assert models.get("digits") is new and new.version == "3"
            answer = await old.pipeline.classify([image], None, 3)  # the request held by the old one finishes
            assert old.retired and answer.results[0].predictions
        assert old.in_flight == 0  # closed once its request left
        with models.use("digits", "3") as held:
            assert (await held.pipeline.classify([image], None, 3)).results[0].predictions
        with pytest.raises(ModelNotFoundError, match="version '2'"):
            models.get("digits", "2")
        assert sorted(c.name for c in admission.costs[1:]) == ["digits:3", "wide:7"]  # 2's went with it
        await models.unload("wide")
        with pytest.raises(ModelNotFoundError, match="serves 'digits'"):
            models.get("wide")

    asyncio.run(main())


def _tampered_version(package: Path, into: Path, tmp: Path) -> Path:
    """A copy of ``package`` at ``into`` whose model.onnx no longer matches its card's sha256."""
    return Path(shutil.move(tampered_copy(package, tmp, "model.onnx"), into))


def test_a_version_that_fails_to_verify_leaves_the_serving_one_and_the_index_says_why(repository, photos, tmp_path):
    async def main():
        models, _ = _models(repository, explicit=True)
        models.load_all([e for e in scan(str(repository)) if e.name == "digits"])
        serving = models.get("digits")
        _tampered_version(Path(serving.entry.source), repository / "digits" / "4", tmp_path)
        with pytest.raises(ModelLoadError, match="version '4' not loaded.*sha256"):
            await models.load("digits")
        assert models.get("digits") is serving
        assert {r["name"]: (r["version"], r["state"]) for r in models.index()} == {
            "digits": ("2", "READY"), "wide": ("7", "UNAVAILABLE")}  # wide: in the folder, not loaded
        (repository / "wide" / "model.onnx").unlink()
        with pytest.raises(ModelLoadError, match="model 'wide' version '7' not loaded"):
            await models.load("wide")
        (row,) = [r for r in models.index() if r["name"] == "wide"]
        assert row["state"] == "UNAVAILABLE" and "model.onnx" in row["reason"]
        assert (await serving.pipeline.classify([photos[0].read_bytes()], None, 1)).results[0].predictions

    asyncio.run(main())


def test_the_poll_tries_a_new_model_that_failed_again_once_its_files_change(repository):
    wide = repository / "wide"
    good = (wide / "model.onnx").read_bytes()
    (wide / "model.onnx").write_bytes(good[:-10] + bytes(10))  # its sha256 no longer matches the card's

    async def main():
        models, _ = _models(repository)
        models.load_all([models.find("digits")])
        models.follow(0.05)
        for _ in range(600):  # the first look finds wide and fails to load it
            await asyncio.sleep(0.05)
            if "wide" in models.failed:
                break
        assert "sha256" in models.failed["wide"] and "wide" not in models.current
        (wide / "model.onnx").write_bytes(good)
        card = (wide / "card.json").read_text()
        (wide / "card.json").write_text(card)  # its card written last, as docs/models.md asks
        for _ in range(600):
            await asyncio.sleep(0.05)
            if "wide" in models.current:
                break
        assert models.get("wide").version == "7" and "wide" not in models.failed

    asyncio.run(main())


def test_the_memory_estimate_counts_weights_activations_and_the_version_in_service(repository):
    from sota_serve.serving.models import ACTIVATION_BYTES_PER_PIXEL

    async def main():
        models, _ = _models(repository)
        wide = models.find("wide")
        weights = max(p.stat().st_size for p in Path(wide.source).glob("model.*"))
        # five-crop (its costliest policy) at 8 images, 40 crops, is the 64 px model's largest warm-up batch
        assert models.expected_bytes(wide) == weights + ACTIVATION_BYTES_PER_PIXEL * 40 * 64 * 64
        models.load_all([models.find("digits")])
        serving = models.get("digits")
        serving.rss_bytes = 2**40  # what the version in service took, however large
        assert models.expected_bytes(models.find("digits")) == 2**40

    asyncio.run(main())


def test_a_model_the_memory_bound_cannot_hold_is_refused_at_load(repository):
    import psutil

    async def main():
        # a worker already at its bound: the model's expected size (twice its artifact) cannot fit
        models, _ = _models(repository, explicit=True, memory_limit_bytes=psutil.Process().memory_info().rss)
        with pytest.raises(ModelLoadError, match="does not fit.*SOTA_SERVE_MEMORY_LIMIT_MB"):
            await models.load("digits")
        assert not models.current and "does not fit" in models.failed["digits"]

    asyncio.run(main())


# --- under `bentoml serve` ----------------------------------------------------------------------

class _Clients:
    """``n`` closed-loop clients, each its own connection, POSTing ``image`` to ``paths`` in turn
    until stopped; every status and latency kept."""

    def __init__(self, url: str, paths: list[str], image: bytes, n: int) -> None:
        self.url, self.paths, self.image = url, paths, image
        self.stop = threading.Event()
        self.results: list[tuple[int, float, str]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            k = i
            while not self.stop.is_set():
                path = self.paths[k % len(self.paths)]
                k += 1
                started = time.perf_counter()
                try:
                    response = client.post(path, files={"image": ("p.jpg", self.image, "image/jpeg")})
                    status, model = response.status_code, response.json().get("model", "")
                except httpx.HTTPError as e:
                    status, model = 0, str(e)
                self.results.append((status, time.perf_counter() - started, model))

    def __enter__(self) -> _Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def _served_version(url: str, name: str) -> str:
    return httpx.get(f"{url}/v2/models/{name}", timeout=10).json()["versions"][0]


def _wait_for(check, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_repository_server_serves_every_model_and_swaps_versions_without_a_failed_request(
        repository, photos, tmp_path):
    grpc_port = free_port()
    server = Server(repository, home=tmp_path / "home", env={
        "SOTA_SERVE_DEVICE": "cpu", "SOTA_SERVE_MODEL_CONTROL": "explicit", "SOTA_SERVE_MODEL_POLL_S": "0.5",
        "SOTA_SERVE_DEFAULT_MODEL": "wide", "SOTA_SERVE_GRPC_PORT": str(grpc_port),
        "SOTA_SERVE_MAX_WAIT_S": str(MAX_WAIT_S)})
    image = photos[0].read_bytes()
    try:
        server.wait_ready()
        url = server.url
        # every model under its name; the plain routes answer the default one
        wide = httpx.post(f"{url}/classify", files={"image": image}, timeout=30).json()
        digits = httpx.post(f"{url}/models/digits/classify", files={"image": image}, timeout=30).json()
        assert wide["model"].endswith(":7") and digits["model"].endswith(":2")
        assert httpx.get(f"{url}/models/digits/card").json()["version"] == "2"
        missing = httpx.post(f"{url}/models/nobody/classify", files={"image": image}, timeout=30)
        assert missing.status_code == 404 and "serves 'wide', 'digits'" in missing.json()["error"]
        page = httpx.get(f"{url}/models/digits/").text
        assert '"prefix": "/models/digits"' in page and '"models": ["wide", "digits"]' in page
        index = httpx.post(f"{url}/v2/repository/index").json()
        assert {(r["name"], r["version"], r["state"]) for r in index} == {("digits", "2", "READY"),
                                                                          ("wide", "7", "READY")}
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        for name in ("digits", "wide"):
            assert client.get_model_metadata(name, as_json=True)["name"] == name
            data = np.array([image], dtype=np.object_)
            tensor = grpcclient.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(data)
            probs = client.infer(name, [tensor]).as_numpy("probabilities")
            rest = httpx.post(f"{url}/models/{name}/classify", files={"image": image}, data={"top_k": "10"}).json()
            assert rest["predictions"][0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)

        with _Clients(url, ["/models/digits/classify", "/classify"], image, 64) as clients:
            time.sleep(2)
            # through the API: a new version folder, loaded on request
            _version(repository / "digits" / "2", repository / "digits" / "3", "3")
            loaded = httpx.post(f"{url}/v2/repository/models/digits/load", timeout=120)
            assert loaded.status_code == 200, loaded.text
            assert _served_version(url, "digits") == "3"
            time.sleep(2)
            # by the folder alone: the poll finds version 4 and swaps it in
            _version(repository / "digits" / "2", repository / "digits" / "4", "4")
            _wait_for(lambda: _served_version(url, "digits") == "4")
            time.sleep(2)
            # version 4 replaced in place (its card rewritten last, as docs/models.md asks): reloaded
            card = json.loads((repository / "digits" / "4" / "card.json").read_text())
            (repository / "digits" / "4" / "card.json").write_text(json.dumps({**card, "version": "4b"}))
            _wait_for(lambda: httpx.get(f"{url}/models/digits/card", timeout=10).json()["version"] == "4b")
            time.sleep(2)
            # a version that fails to verify: the serving one stays, the index says why
            _tampered_version(repository / "digits" / "2", repository / "digits" / "5", tmp_path / "tampered")
            refused = httpx.post(f"{url}/v2/repository/models/digits/load", timeout=120)
            assert refused.status_code == 400 and "sha256" in refused.json()["error"]
            time.sleep(2)
        assert _served_version(url, "digits") == "4"
        statuses = [s for s, _, _ in clients.results]
        assert len(statuses) > 500 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        assert max(t for _, t, _ in clients.results) < MAX_WAIT_S
        served = {m.rsplit(":", 1)[-1] for _, _, m in clients.results}
        assert served == {"2", "3", "4", "4b", "7"}  # digits' versions answered while the clients ran, and wide
        metrics = httpx.get(f"{url}/metrics").text
        assert 'sota_serve_model_rss_bytes{model="digits"' in metrics
    finally:
        server.stop()
