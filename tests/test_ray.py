"""The Ray Serve application on a real multi-node Ray cluster (a head and three worker nodes
on this machine), against `bentoml serve` on the same package.

Ray replaces a node address of 127.0.0.1 with the machine's external one, so the cluster and
its clients run in a network namespace of the test's own that holds only loopback (``unshare
--net``, which needs root, as CI has); Ray's token auth with a token file of the test's own.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.server import Server
from sota_serve.http.docs import ASSET_PREFIX
from tests.test_server import post

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-cnn"
#: the second model of the repository both servers serve (the same model under another name)
SECOND = "tiny-second"
#: clients sending while a node is lost
CLIENTS = 32
#: a client gives up on a request after this long: none may take longer
DEADLINE_S = 25.0
#: the service must be whole again this long after losing a node
RECOVERY_LIMIT_S = 30.0
#: an OIP infer request on raw pixels (1 x 3 x 32 x 32), the same for both servers
INFER = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 32, 32],
                     "data": [(7 * i) % 256 for i in range(3 * 32 * 32)]}]}


def _namespace_unavailable() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare (util-linux) and ip (iproute2) for the cluster's own network namespace"
    probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a network namespace here (unshare --net needs root): {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def models(tiny_package, tmp_path_factory) -> str:
    """The two packages both servers serve, as SOTA_SERVE_MODEL lists them: the tiny model,
    the default, and a copy of it named SECOND."""
    second = tmp_path_factory.mktemp("second") / SECOND
    shutil.copytree(tiny_package, second)
    card = json.loads((second / "card.json").read_text())
    (second / "card.json").write_text(json.dumps({**card, "name": SECOND, "version": "3"}))
    return f"{tiny_package},{second}"


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """`bentoml serve` of the same two models, to compare the cluster's answers with."""
    srv = Server(models, home=tmp_path_factory.mktemp("bentoml-home"), env={"SOTA_SERVE_DEVICE": "cpu"})
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def cluster_results(models, photos, tmp_path_factory):
    reason = _namespace_unavailable()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("ray")
    token = work / "token"
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    config = work / "config.json"
    config.write_text(json.dumps({
        "package": models, "photos": [str(p) for p in photos], "model_name": NAME, "second_name": SECOND,
        "infer": INFER, "deadline_s": DEADLINE_S, "recovery_limit_s": RECOVERY_LIMIT_S,
        # one decode thread and one model call per one-CPU replica; no wait at the door
        "args": {"cpus_per_replica": 1, "decode_threads": 1, "model_threads": 1, "admission_hold_s": 0,
                 # the ingress on the head (the only node with this resource), off the workers
                 "cpus_per_ingress": 0, "ingress_resources": {"ingress": 1}},
    }))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "RAY_TMPDIR": str(work / "ray")}
    script = f"ip link set lo up && exec {sys.executable} {ROOT / 'tests' / 'ray_cluster.py'} {config}"
    started = time.monotonic()
    out = subprocess.run(["unshare", "--net", "bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    results["wall_s"] = round(time.monotonic() - started, 1)
    print("ray cluster:", json.dumps({k: v for k, v in results.items() if k not in ("answers", "contract", "docs")}))
    return results


@pytest.mark.slow
def test_two_replicas_on_two_nodes(cluster_results):
    nodes = cluster_results["replica_nodes"]
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    assert set(nodes) <= set(cluster_results["worker_nodes"]), "replicas run on worker nodes, not the head"
    assert cluster_results["ingress_node"] == cluster_results["head_node"], "the ingress runs on the head"


@pytest.mark.slow
@pytest.mark.parametrize("tta", ["none", "five_crop"])
def test_answers_equal_bentoml_serve(cluster_results, server, photos, tta):
    for photo in photos:
        expected = post(server, "/classify", {"image": ("photo.jpg", photo.read_bytes())}, {"tta": tta}).json()
        assert cluster_results["answers"][f"{photo.name}/{tta}"] == expected, photo.name


@pytest.mark.slow
def test_the_other_routes_answer_as_bentoml_serve(cluster_results, server, photos):
    ours = cluster_results["contract"]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        theirs = {
            "card": client.get("/card"), "card_post": client.post("/card"),
            "live": client.get("/v2/health/live"), "ready": client.get("/v2/health/ready"),
            "server_metadata": client.get("/v2"), "model_metadata": client.get(f"/v2/models/{NAME}"),
            "infer": client.post(f"/v2/models/{NAME}/infer", json=INFER),
            "batch": client.post("/classify_batch", files={"images": ("photo.jpg", photos[0].read_bytes())},
                                 data={"tta": "none"}),
            "not_an_image": client.post("/classify", files={"image": ("a.txt", b"not an image")}),
            "other_model": client.get("/v2/models/another-model"),
            "second_classify": client.post(f"/models/{SECOND}/classify",
                                           files={"image": ("photo.jpg", photos[0].read_bytes())}, data={"tta": "none"}),
            "second_metadata": client.get(f"/v2/models/{SECOND}"), "second_card": client.get(f"/models/{SECOND}/card"),
            "index": client.post("/v2/repository/index"),
            "explain": client.post("/explain", files={"image": ("photo.jpg", photos[0].read_bytes())},
                                   data={"grid": "4"}),
            "fallback": client.post("/classify", files={"image": ("photo.jpg", photos[0].read_bytes())},
                                    data={"tta": "five_crop", "tta_fallback": "true", "tta_budget_s": "1e-6"}),
        }
    mine, theirs_map = ours.pop("explain"), theirs.pop("explain").json()
    numbers = ("grid", "score")  # computed in batches that other work may have joined: equal within 1e-5
    assert mine["status"] == 200 and {k: v for k, v in mine["body"].items() if k not in numbers} == {
        k: v for k, v in theirs_map.items() if k not in numbers}
    assert all(np.allclose(mine["body"][k], theirs_map[k], atol=1e-5) for k in numbers)
    assert ours["fallback"]["body"]["requested_tta"] == "five_crop" and ours["fallback"]["body"]["tta"] == "none"
    for key, response in theirs.items():
        assert ours[key] == {"status": response.status_code, "body": response.json()}, key
    assert ours["no_such_route"]["status"] == 404 and "error" in ours["no_such_route"]["body"]
    assert ours["second_classify"]["body"]["model"] == f"{SECOND}:3"
    assert [(m["name"], m["state"]) for m in ours["index"]["body"]] == [(NAME, "READY"), (SECOND, "READY")]
    # under Ray a call reaches one replica of many: the cluster changes its models by a deploy
    assert ours["load_refused"]["status"] == 403


@pytest.mark.slow
def test_the_openapi_document_and_its_ui_are_bentoml_serves(cluster_results, server):
    import hashlib

    ours = cluster_results["docs"]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert ours["document"] == client.get("/docs.json").json()
        assert ours["page"] == client.get("/docs").text and "swagger-ui" in ours["page"]
        for name, mine in ours["assets"].items():
            theirs = client.get(ASSET_PREFIX + name)
            assert mine == [theirs.status_code, theirs.headers["content-type"], hashlib.sha256(theirs.content).hexdigest()]
            assert mine[0] == 200, name


@pytest.mark.slow
def test_grpc_through_rays_proxy_answers_as_bentoml_serve(cluster_results, server, photos):
    """tritonclient.grpc through Ray Serve's gRPC proxy, against `bentoml serve`'s REST answers."""
    import tritonclient.http as triton

    from tests.test_grpc import _images

    ours = cluster_results["grpc"]
    assert ours["live"] and ours["ready"] and ours["model_ready"] and ours["ready_after"]
    for tensor in ours["metadata"]["inputs"] + ours["metadata"]["outputs"]:  # protobuf's JSON: int64 as text
        tensor["shape"] = [int(s) for s in tensor["shape"]]
    files = [p.read_bytes() for p in photos]  # the photos the cluster was sent
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as rest:
        assert ours["metadata"] == rest.get_model_metadata(NAME)
        for tta, probs in ours["probs"].items():
            assert ours["tta"][tta] == tta
            want = rest.infer(NAME, [_images(triton, files)], parameters={"tta": tta})
            np.testing.assert_allclose(np.array(probs, np.float32), want.as_numpy("probabilities"), atol=1e-6, rtol=0)
    errors = ours["errors"]
    assert errors["other_model"]["code"] == "NOT_FOUND"
    assert errors["other_model"]["details"] == f"no model 'another-model' here; this server serves '{NAME}', '{SECOND}'"
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as rest:
        want = rest.infer(SECOND, [_images(triton, files[:1])]).as_numpy("probabilities")
    np.testing.assert_allclose(np.array(ours["second_probs"], np.float32), want, atol=1e-6, rtol=0)
    assert errors["not_an_image"]["code"] == "INVALID_ARGUMENT"
    assert errors["not_an_image"]["details"].startswith("image 0 of 1: the bytes are not a recognised image")
    strict = errors["strict_budget"]
    assert strict["code"] == "UNAVAILABLE" and strict["trailers"]["retry-after"].isdigit()
    assert strict["details"].startswith("not even tta 'none' can be answered within the 1e-06 s budget")
    assert errors["over_limit"]["code"] == "RESOURCE_EXHAUSTED"
    assert "SOTA_SERVE_MAX_BODY_BYTES" in errors["over_limit"]["details"]


@pytest.mark.slow
def test_losing_a_node_under_load(cluster_results):
    load = cluster_results["load"]
    assert load["before_removal"] > 0 and load["requests"] > load["before_removal"]
    # Every request gets an answer (no connection error) of 200, or 503 with Retry-After: from
    # a model replica's admission, or from the ingress when the model replica that had the
    # request died with its node and the one more try found none either.
    assert set(load["statuses"]) <= {"200", "503"}, load
    assert load["503_without_retry_after"] == 0, load
    assert load["longest_s"] < DEADLINE_S, load
    assert load["recovery_s"] is not None and load["recovery_s"] <= RECOVERY_LIMIT_S, load
    assert len(cluster_results["replica_nodes_after"]) == 2


@pytest.mark.slow
def test_the_placement_is_checked_against_the_cluster(cluster_results):
    placement = cluster_results["placement"]
    # three one-CPU workers: four one-CPU model replicas cannot be placed, and the builder says
    # so in one line before anything is deployed; unasked, it takes two
    assert placement["refused"] is not None and "\n" not in placement["refused"], placement
    refused = placement["refused"]
    assert refused.startswith("the cluster cannot hold 1 ingress replica of {ingress: 1} and 4 model replicas"
                              " of {CPU: 1}: its 4 live node(s) have "), placement
    assert "{CPU: 0, ingress: 10}" in refused and refused.count("{CPU: 1, ingress: 0}") == 3, placement
    assert placement["refused_in_s"] < 5, placement
    assert placement["default_replicas"] == 2, placement


@pytest.mark.slow
def test_a_full_queue_is_answered_503_at_the_ingress(cluster_results):
    burst = cluster_results["busy"]["burst"]
    statuses = sorted(r["status"] for r in burst)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1, statuses
    shed = [r for r in burst if r["status"] == 503]
    assert shed, "16 requests at once against one request at a time and one queued: some are shed"
    for r in shed:
        # the router's refusal, in the contract's shape, not a model replica's admission
        assert r["retry_after"] is not None and int(r["retry_after"]) >= 1, r
        assert "max_queued_requests" in r["body"]["error"], r
    assert all(r["body"]["label"] for r in burst if r["status"] == 200)


@pytest.mark.slow
def test_a_model_replicas_exception_is_a_json_500(cluster_results):
    broken = cluster_results["busy"]["broken"]
    # the replica raised TypeError on a form it could not read; Ray raised it at the ingress
    assert broken["status"] == 500, broken
    assert set(broken["body"]) == {"error"} and "TypeError" in broken["body"]["error"], broken


def _config_args() -> list[dict]:
    import yaml

    serve_file = yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    kube = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "rayservice.yaml").read_text())
    apps = serve_file["applications"] + yaml.safe_load(kube["spec"]["serveConfigV2"])["applications"]
    assert {a["import_path"] for a in apps} == {"rayserve.app:app"}
    return [a["args"] for a in apps]


def test_the_config_files_give_the_builder_arguments_it_takes():
    from rayserve.app import app

    for args in _config_args():
        assert app(args) is not None  # the builder validates them (ArgsError otherwise)


def test_replicas_take_a_gpu_each_when_asked_and_autoscale_by_default():
    from rayserve.args import AppArgs

    gpu = AppArgs.parse({"model": "m", "gpus_per_replica": "1", "max_replicas": "8"})
    options = gpu.deployment_options()
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert gpu.service_settings().device == "cuda"
    # one decode thread, one model call of 128 images (the GPU batch): 129 ongoing requests;
    # two replicas unless the cluster holds only one
    assert options["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 129.0}
    # a replica takes twice its work in hand; the router at the ingress queues as many more
    assert options["max_ongoing_requests"] == 258 and options["max_queued_requests"] == 258
    cpu = AppArgs.parse({"model": "m", "num_replicas": 3, "cpus_per_replica": 2, "max_wait_s": "5"})
    assert cpu.deployment_options()["num_replicas"] == 3 and "autoscaling_config" not in cpu.deployment_options()
    settings = cpu.service_settings()
    assert (settings.device, settings.decode_threads, settings.model_threads, settings.max_wait_s) == ("cpu", 4, 2, 5)
    bounded = AppArgs.parse({"model": "m", "max_ongoing_requests": 8, "max_queued_requests": "3"}).deployment_options()
    assert (bounded["max_ongoing_requests"], bounded["max_queued_requests"]) == (8, 3)


def test_a_placement_the_nodes_cannot_hold_is_refused_in_one_line():
    from rayserve.args import AppArgs, ArgsError

    two_cores = [{"CPU": 2.0, "memory": 8e9, "node:127.0.0.1": 1.0}]
    # two one-CPU model replicas and the ingress's tenth of a CPU: 2.1 CPUs on a 2-CPU machine
    with pytest.raises(ArgsError, match=r"cannot hold 1 ingress replica of \{CPU: 0.1\} and 2 model replicas"
                                        r" of \{CPU: 1\}: its 1 live node\(s\) have \{CPU: 2\}") as refused:
        AppArgs.parse({"model": "m", "num_replicas": 2}).fit(two_cores)
    assert "\n" not in str(refused.value)
    # unasked, one replica where two do not fit, two where they do
    assert AppArgs.parse({"model": "m"}).fit(two_cores).deployment_options()["autoscaling_config"]["min_replicas"] == 1
    assert AppArgs.parse({"model": "m"}).fit([{"CPU": 4.0}]).initial_replicas() == 2
    assert AppArgs.parse({"model": "m", "max_replicas": 1}).fit([{"CPU": 4.0}]).initial_replicas() == 1
    # each replica fits whole on one node: 3 CPUs in all, but no node holds two one-CPU replicas
    with pytest.raises(ArgsError, match="3 model replicas"):
        AppArgs.parse({"model": "m", "num_replicas": 3, "cpus_per_ingress": 0}).fit([{"CPU": 1.5}, {"CPU": 1.5}])
    assert AppArgs.parse({"model": "m", "num_replicas": 3, "cpus_per_ingress": 0}).fit(
        [{"CPU": 2.0}, {"CPU": 1.0}]).initial_replicas() == 3
    with pytest.raises(ArgsError, match=r"GPU: 1"):
        AppArgs.parse({"model": "m", "gpus_per_replica": 1, "min_replicas": 1}).fit([{"CPU": 8.0}])
    with pytest.raises(ArgsError, match=r"ingress: 1"):  # no node declares the ingress's resource
        AppArgs.parse({"model": "m", "ingress_resources": {"ingress": 1}}).fit([{"CPU": 8.0}])
    # nodes that join later (check_placement=false), or no cluster to look at: not checked
    late = AppArgs.parse({"model": "m", "min_replicas": 2, "check_placement": "false"}).fit([{"CPU": 0.0}])
    assert late.initial_replicas() == 2
    assert AppArgs.parse({"model": "m", "num_replicas": 9}).fit(None).initial_replicas() == 9


def test_the_ingress_is_light_holds_what_the_model_replicas_hold_and_goes_where_its_resources_are():
    from rayserve.args import AppArgs

    default = AppArgs.parse({"model": "m", "max_replicas": "3"}).ingress_options()
    # one replica of a tenth of a CPU, anywhere; it takes what three model replicas admit
    assert default == {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 3 * 1024}
    placed = AppArgs.parse({"model": "m", "num_replicas": 2, "ingress_replicas": 2, "cpus_per_ingress": 0,
                            "ingress_resources": {"ingress": 1}}).ingress_options()
    assert placed == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0, "resources": {"ingress": 1}},
                      "max_ongoing_requests": 2 * 1024}


def test_wrong_arguments_are_refused_by_name():
    from rayserve.args import AppArgs, ArgsError

    with pytest.raises(ArgsError, match="unknown argument.*replicas"):
        AppArgs.parse({"model": "m", "replicas": 2})
    with pytest.raises(ArgsError, match="device"):
        AppArgs.parse({"model": "m", "device": "tpu"})
    with pytest.raises(ArgsError, match="min_replicas"):
        AppArgs.parse({"model": "m", "min_replicas": 5, "max_replicas": 2})
