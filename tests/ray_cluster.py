"""A Ray cluster on this machine serving the application, driven from inside the network
namespace the test runs it in (``python tests/ray_cluster.py CONFIG.json``; prints one JSON
line of results). tests/test_ray.py runs it and checks the results.

A head (no CPUs: it schedules and runs Ray's HTTP and gRPC proxies and, through a custom resource only it
declares, the ingress replica) and three one-CPU worker nodes; two one-CPU model replicas, so
Ray places them on two different workers. The builder is asked for four (refused) and for
the default (two). A second application on the third worker takes one request at a time and
queues one: a burst shows the router's 503s, and a form its model replica cannot read shows
its exception as the ingress answers it. Then one replica's node is removed while 32 clients
keep sending, and the time until every route answers 200 again with two replicas running is
measured. Every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

URL = "http://127.0.0.1:8000"
#: Ray's gRPC proxy, serving the Open Inference Protocol's GRPCInferenceService
GRPC = "127.0.0.1:9000"
SERVICER = "sota_serve.grpc.server.add_inference_service"
APP = "sota-serve"
CLIENTS = 32


def main(config: dict[str, Any]) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from rayserve.app import app

    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"ingress": 10},
                                                                   "dashboard_host": "127.0.0.1"})
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=cluster.address, logging_level="warning")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000}, proxy_location="HeadOnly",
                    grpc_options={"port": int(GRPC.rsplit(":", 1)[1]), "grpc_servicer_functions": [SERVICER]})
        serve.run(app({"model": config["package"], "num_replicas": 2, "device": "cpu", **config["args"]}),
                  name=APP, route_prefix="/")
        results: dict[str, Any] = {"ready_s": round(time.monotonic() - started, 1)}

        handle = serve.get_deployment_handle("sota_serve", APP)
        ingress = serve.get_app_handle(APP)
        results["ingress_node"] = ingress.node_id.remote().result(timeout_s=30)
        results["head_node"] = ray.get_runtime_context().get_node_id()

        def replica_nodes() -> list[str]:
            """The nodes that answer through a handle (each replica, with near certainty: the
            router picks between two idle replicas at random each time)."""
            return sorted({handle.node_id.remote().result(timeout_s=30) for _ in range(24)})

        def replicas_running() -> bool:
            deployment = serve.status().applications[APP].deployments["sota_serve"]
            return deployment.replica_states.get("RUNNING", 0) == 2

        nodes = replica_nodes()
        results["replica_nodes"] = nodes
        results["worker_nodes"] = [w.node_id for w in workers]
        with httpx.Client(base_url=URL, timeout=30) as client:
            results["answers"] = answers(client, config)
            results["contract"] = contract(client, config)
            results["docs"] = docs(client)
        results["grpc"] = grpc_calls(config)
        results["placement"] = placement(config)
        results["busy"] = busy(config)  # on the third worker, given back before a node is lost
        victim = next(w for w in workers if w.node_id == nodes[0])
        results["load"] = node_loss(lambda: cluster.remove_node(victim, allow_graceful=False), config,
                                    replicas_running=replicas_running)
        for _ in range(20):  # the handle's router learns of the new replica within seconds
            results["replica_nodes_after"] = replica_nodes()
            if len(results["replica_nodes_after"]) == 2:
                break
            time.sleep(0.5)
        results["total_s"] = round(time.monotonic() - started, 1)
        return results
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def placement(config: dict[str, Any]) -> dict[str, Any]:
    """What the builder makes of this cluster (3 one-CPU workers, the head with the ingress
    resource): four one-CPU model replicas refused at once, and two by default."""
    from rayserve.app import app, cluster_nodes
    from rayserve.args import AppArgs, ArgsError

    started = time.monotonic()
    try:
        app({"model": config["package"], "num_replicas": 4, "device": "cpu", **config["args"]})
        refused = None
    except ArgsError as e:
        refused = str(e)
    default = AppArgs.parse({"model": config["package"], **config["args"]}).fit(cluster_nodes())
    return {"refused": refused, "refused_in_s": round(time.monotonic() - started, 2),
            "default_replicas": default.initial_replicas()}


def busy(config: dict[str, Any]) -> dict[str, Any]:
    """A second application under /busy, one model replica taking one request at a time and
    one more queued at the ingress's router: 16 /explain requests at once. Then a real
    exception in that model replica (a form it cannot read) through the real ingress code."""
    import asyncio

    from ray import serve

    from rayserve.app import app
    from rayserve.ingress import Ingress
    from sota_serve.http.limits import Limits

    serve.run(app({"model": config["package"], "num_replicas": 1, "device": "cpu", **config["args"],
                   "max_ongoing_requests": 1, "max_queued_requests": 1}), name="busy", route_prefix="/busy")
    photo = Path(config["photos"][0]).read_bytes()
    start = threading.Barrier(16)

    def explain(_: int) -> dict[str, Any]:
        with httpx.Client(base_url=URL, timeout=60) as client:
            start.wait(timeout=30)
            r = client.post("/busy/explain", files={"image": ("p.jpg", photo)}, data={"grid": "16"})
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after"), "body": r.json()}

    with ThreadPoolExecutor(16) as pool:
        burst = list(pool.map(explain, range(16)))
    handle = serve.get_deployment_handle("sota_serve", "busy")
    front = Ingress(lambda method, *args: handle.post.remote("/classify", None, 0),
                    Limits(max_body_bytes=1 << 20, body_timeout_s=10, max_files=1), timeout_s=30)

    async def nothing() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    status, headers, body = asyncio.run(front.handle({"type": "http", "method": "GET", "path": "/card",
                                                      "headers": []}, nothing))
    serve.delete("busy")
    return {"burst": burst, "broken": {"status": status, "headers": headers, "body": json.loads(body)}}


def answers(client: httpx.Client, config: dict[str, Any]) -> dict[str, Any]:
    """Each photo under each policy, asked four times (the proxy spreads them over both
    replicas): the distinct answers, which must be one."""
    out: dict[str, Any] = {}
    for photo in config["photos"]:
        data = Path(photo).read_bytes()
        for tta in ("none", "five_crop"):
            seen = {post_image(client, "/classify", data, tta).text for _ in range(4)}
            out[f"{Path(photo).name}/{tta}"] = sorted(json.loads(s) for s in seen) if len(seen) > 1 \
                else json.loads(seen.pop())
    return out


def post_image(client: httpx.Client, path: str, data: bytes, tta: str, tries: int = 5) -> httpx.Response:
    """A 503 (shedding, with Retry-After) is tried again, a few times."""
    for _ in range(tries):
        field = "images" if path.endswith("/classify_batch") else "image"
        response = client.post(path, files={field: ("photo.jpg", data)}, data={"tta": tta})
        if response.status_code != 503:
            return response
        time.sleep(0.2)
    return response


def contract(client: httpx.Client, config: dict[str, Any]) -> dict[str, Any]:
    """Status and body of the other routes, for the test to compare with `bentoml serve`'s."""
    name = config["model_name"]
    photo = Path(config["photos"][0]).read_bytes()
    calls = {
        "card": client.get("/card"),
        "card_post": client.post("/card"),
        "live": client.get("/v2/health/live"),
        "ready": client.get("/v2/health/ready"),
        "server_metadata": client.get("/v2"),
        "model_metadata": client.get(f"/v2/models/{name}"),
        "infer": client.post(f"/v2/models/{name}/infer", json=config["infer"]),
        "batch": post_image(client, "/classify_batch", photo, "none"),
        "not_an_image": client.post("/classify", files={"image": ("a.txt", b"not an image")}),
        "no_such_route": client.get("/no-such-route"),
        "other_model": client.get("/v2/models/another-model"),
        # the second model of the repository, on its own routes
        "second_classify": post_image(client, f"/models/{config['second_name']}/classify", photo, "none"),
        "second_metadata": client.get(f"/v2/models/{config['second_name']}"),
        "second_card": client.get(f"/models/{config['second_name']}/card"),
        "index": client.post("/v2/repository/index"),
        "load_refused": client.post(f"/v2/repository/models/{config['second_name']}/load"),
        "explain": client.post("/explain", files={"image": ("photo.jpg", photo)}, data={"grid": "4"}),
        # a budget nothing fits: the ladder serves the plain policy
        "fallback": client.post("/classify", files={"image": ("photo.jpg", photo)},
                                data={"tta": "five_crop", "tta_fallback": "true", "tta_budget_s": "1e-6"}),
    }
    return {key: {"status": r.status_code, "body": r.json()} for key, r in calls.items()}


def docs(client: httpx.Client) -> dict[str, Any]:
    """The OpenAPI document, its UI's page and the UI's assets (status, type, sha256), for the
    test to compare with `bentoml serve`'s."""
    import hashlib

    from sota_serve.http.docs import ASSET_PREFIX, ASSETS

    assets = {name: client.get(ASSET_PREFIX + name) for name in ASSETS}
    return {"document": client.get("/docs.json").json(), "page": client.get("/docs").text,
            "assets": {name: [r.status_code, r.headers["content-type"], hashlib.sha256(r.content).hexdigest()]
                       for name, r in assets.items()}}


def grpc_calls(config: dict[str, Any]) -> dict[str, Any]:
    """The Open Inference Protocol over gRPC through Ray's proxy, with tritonclient.grpc: health,
    metadata, the photos' probabilities under each policy, and each error's code, details and
    trailing metadata."""
    import grpc
    import numpy as np
    import tritonclient.grpc as triton
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from sota_serve.oip.messages import encode_bytes

    name = config["model_name"]
    photos = [Path(p).read_bytes() for p in config["photos"]]
    client = triton.InferenceServerClient(GRPC)
    out: dict[str, Any] = {"live": client.is_server_live(), "ready": client.is_server_ready(),
                           "model_ready": client.is_model_ready(name),
                           "metadata": client.get_model_metadata(name, as_json=True), "probs": {}, "tta": {}}
    for tta in ("none", "five_crop"):
        tensor = triton.InferInput("image", [len(photos)], "BYTES")
        tensor.set_data_from_numpy(np.array(photos, dtype=np.object_))
        result = client.infer(name, [tensor], parameters={"tta": tta})
        out["probs"][tta] = result.as_numpy("probabilities").tolist()
        out["tta"][tta] = result.get_response().parameters["tta"].string_param

    def request(files: list[bytes], model: str = name, **parameters: Any) -> Any:
        message = service_pb2.ModelInferRequest(model_name=model, raw_input_contents=[encode_bytes(files)])
        message.inputs.add(name="image", datatype="BYTES", shape=[len(files)])
        for key, value in parameters.items():
            field = {str: "string_param", bool: "bool_param", float: "double_param"}[type(value)]
            setattr(message.parameters[key], field, value)
        return message

    channel = grpc.insecure_channel(GRPC, options=[("grpc.max_send_message_length", -1)])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def outcome(message: Any) -> dict[str, Any]:
        try:
            stub.ModelInfer(message, timeout=60)
            return {"code": "OK"}
        except grpc.RpcError as e:
            return {"code": e.code().name, "details": e.details(), "trailers": dict(e.trailing_metadata() or ())}

    second = triton.InferInput("image", [1], "BYTES")
    second.set_data_from_numpy(np.array(photos[:1], dtype=np.object_))
    out["second_probs"] = client.infer(config["second_name"], [second]).as_numpy("probabilities").tolist()
    out["errors"] = {
        "other_model": outcome(request(photos[:1], model="another-model")),
        "not_an_image": outcome(request([b"not an image"])),
        # a budget nothing fits, strictly: refused (REST: 503 with Retry-After)
        "strict_budget": outcome(request(photos[:1], tta="five_crop", tta_fallback=True, tta_budget_strict=True,
                                         tta_budget_s=1e-6)),
        "over_limit": outcome(request([b"\xff\xd8" + bytes(22 * 1024 * 1024)])),
    }
    out["ready_after"] = client.is_server_ready()
    channel.close()
    client.close()
    return out


def node_loss(remove, config: dict[str, Any], replicas_running) -> dict[str, Any]:
    """32 clients send /classify until the service is whole again after ``remove()``; every
    answer's status (and Retry-After on 503), the longest request, and the recovery time."""
    photo = Path(config["photos"][0]).read_bytes()
    deadline_s, stop = config["deadline_s"], threading.Event()
    outcomes: list[tuple[int, bool, float, float]] = []  # status (0: no answer), Retry-After, start, seconds

    def client_loop() -> None:
        with httpx.Client(base_url=URL, timeout=deadline_s) as client:
            for _ in range(10_000):
                if stop.is_set():
                    return
                t0 = time.monotonic()
                try:
                    r = client.post("/classify", files={"image": ("p.jpg", photo)}, data={"tta": "none"})
                    outcomes.append((r.status_code, "retry-after" in r.headers, t0, time.monotonic() - t0))
                except httpx.HTTPError:
                    outcomes.append((0, False, t0, time.monotonic() - t0))

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client_loop) for _ in range(CLIENTS)]
        time.sleep(3)
        before = len(outcomes)
        removed_at = time.monotonic()
        remove()
        removed_s = time.monotonic() - removed_at
        recovered_s = wait_whole(config, replicas_running, removed_at, limit_s=config["recovery_limit_s"])
        time.sleep(1)
        stop.set()
        for f in futures:
            f.result(timeout=deadline_s + 10)
    statuses = Counter(s for s, _, _, _ in outcomes)
    return {
        "requests": len(outcomes), "before_removal": before, "before_rps": round(before / 3, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "503_without_retry_after": sum(1 for s, ra, _, _ in outcomes if s == 503 and not ra),
        "longest_s": round(max(t for _, _, _, t in outcomes), 2),
        "removal_took_s": round(removed_s, 2),
        # when each failed request (not 200, not 503) started, in seconds after the removal began
        "failed_started_at_s": sorted(round(t0 - removed_at, 2) for s, _, t0, _ in outcomes if s not in (200, 503)),
        "recovery_s": recovered_s,
    }


def wait_whole(config: dict[str, Any], replicas_running, since: float, limit_s: float) -> float | None:
    """Seconds from ``since`` until two replicas run and every route answers 200; None if not
    within ``limit_s``."""
    name, photo = config["model_name"], Path(config["photos"][0]).read_bytes()
    with httpx.Client(base_url=URL, timeout=10) as client:
        while time.monotonic() - since < limit_s:
            try:
                ok = replicas_running() and all(r.status_code == 200 for r in (
                    client.get("/card"), client.get("/v2/health/ready"), client.get(f"/v2/models/{name}"),
                    client.post("/classify", files={"image": ("p.jpg", photo)}),
                    client.post("/classify_batch", files={"images": ("p.jpg", photo)}),
                    client.post(f"/v2/models/{name}/infer", json=config["infer"])))
            except httpx.HTTPError:
                ok = False
            if ok:
                return round(time.monotonic() - since, 1)
            time.sleep(0.5)
    return None


if __name__ == "__main__":
    config = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(main(config)))
