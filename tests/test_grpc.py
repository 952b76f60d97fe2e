"""The Open Inference Protocol over gRPC: the compiled descriptors against the .proto files, the
status mapping, the codec, and tritonclient.grpc against a real `bentoml serve` with two
workers on one gRPC port, compared with the same server's REST answers."""

from __future__ import annotations

import contextlib
import io
import re
import socket
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.server import Server, free_port
from sota_serve import errors
from sota_serve.errors import ModelNotFoundError
from sota_serve.grpc import compiled, protos
from sota_serve.grpc.codec import TooManyValuesError, read_infer
from sota_serve.grpc.status import RETRY_AFTER, status_of, trailers
from sota_serve.http.oip_codec import parse_infer
from sota_serve.image.preprocess import Preprocessor
from sota_serve.oip.messages import MAX_VALUES, encode_bytes
from sota_serve.package.card import ModelCard
from tests.helpers import LABELS, card_dict, encode, gradient_image
from tests.test_hostile import CORPUS

ROOT = Path(__file__).resolve().parents[1]
CARD = ModelCard.parse(card_dict())
NAME = "tiny-cnn"
#: the server's body limit, above gRPC's 4 MiB default
LIMIT = 6 * 1024 * 1024
WORKERS = 2
#: REST status -> gRPC code (sota_serve/grpc/status.py)
CODES = {200: grpc.StatusCode.OK, 400: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         415: grpc.StatusCode.INVALID_ARGUMENT}


# --- the compiled descriptors are the .proto files ------------------------------------------------


_TOKEN = re.compile(r'"[^"]*"|[A-Za-z_][\w.]*|\d+|[{}();=<>,\[\]]')


def _proto_declarations(text: str) -> set[tuple]:
    """Messages, fields (with label, type and number), enum values, oneofs and rpcs of a .proto
    file, read from its text."""
    tokens = _TOKEN.findall(re.sub(r"//[^\n]*", "", text))
    found: set[tuple] = set()
    scope: list[tuple[str, str]] = []  # (kind, name)
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in ("syntax", "package", "option"):
            i = tokens.index(";", i) + 1
        elif t in ("message", "enum", "service", "oneof") and tokens[i + 2] == "{":
            scope.append((t, tokens[i + 1]))
            found.add((t, *[n for _, n in scope]))
            i += 3
        elif t == "}":
            scope.pop()
            i += 1
        elif t == "rpc":  # ends in ";" or in an empty body, "{}"
            end = next(j for j in range(i, len(tokens)) if tokens[j] in (";", "{"))
            words = [w for w in tokens[i + 1:end] if w not in "(){}"]
            name, rest = words[0], words[1:]
            request_streaming = rest[0] == "stream"
            request = rest[1] if request_streaming else rest[0]
            rest = rest[rest.index("returns") + 1:]
            response_streaming = rest[0] == "stream"
            response = rest[1] if response_streaming else rest[0]
            found.add(("rpc", scope[-1][1], name, request, response, request_streaming, response_streaming))
            i = end + (2 if tokens[end] == "{" else 1)
        else:
            end = tokens.index(";", i)
            statement = tokens[i:end]
            messages = [n for kind, n in scope if kind == "message"]
            if scope[-1][0] == "enum":
                found.add(("value", *[n for _, n in scope], statement[0], int(statement[2])))
            elif statement[0] == "map":
                key, value, name, number = statement[2], statement[4], statement[6], statement[8]
                found.add(("field", *messages, name, f"map<{key},{value}>", int(number)))
            else:
                label = statement[0] if statement[0] == "repeated" else ""
                kind, name, _, number = statement[1:5] if label else statement[:4]
                oneof = scope[-1][1] if scope[-1][0] == "oneof" else None
                found.add(("field", *messages, name, f"{label} {kind}".strip(), int(number)))
                if oneof:
                    found.add(("in", *messages, oneof, name))
            i = end + 1
    return found


_KINDS = {v: k.removeprefix("TYPE_").lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}


def _type_of(field: descriptor_pb2.FieldDescriptorProto, message: descriptor_pb2.DescriptorProto) -> str:
    """A field's type as the .proto spells it (a map as ``map<key,value>``)."""
    if not field.type_name:
        return _KINDS[field.type]
    short = field.type_name.rsplit(".", 1)[1]
    entry = next((m for m in message.nested_type if m.name == short and m.options.map_entry), None)
    if entry is None:
        return short
    key, value = (_type_of(f, entry) for f in entry.field)
    return f"map<{key},{value}>"


def _message_declarations(message: descriptor_pb2.DescriptorProto, path: tuple[str, ...]) -> set[tuple]:
    if message.options.map_entry:
        return set()
    found: set[tuple] = {("message", *path)} | {("oneof", *path, o.name) for o in message.oneof_decl}
    for field in message.field:
        kind = _type_of(field, message)
        repeated = field.label == field.LABEL_REPEATED and not kind.startswith("map<")
        found.add(("field", *path, field.name, f"repeated {kind}" if repeated else kind, field.number))
        if field.HasField("oneof_index"):
            found.add(("in", *path, message.oneof_decl[field.oneof_index].name, field.name))
    for nested in message.nested_type:
        found |= _message_declarations(nested, (*path, nested.name))
    for enum in message.enum_type:
        found.add(("enum", *path, enum.name))
        found |= {("value", *path, enum.name, v.name, v.number) for v in enum.value}
    return found


def _descriptor_declarations(file: descriptor_pb2.FileDescriptorProto) -> set[tuple]:
    """The same declarations, read from a compiled descriptor."""
    found: set[tuple] = set()
    for message in file.message_type:
        found |= _message_declarations(message, (message.name,))
    for service in file.service:
        found.add(("service", service.name))
        found |= {("rpc", service.name, m.name, m.input_type.rsplit(".", 1)[1], m.output_type.rsplit(".", 1)[1],
                   m.client_streaming, m.server_streaming) for m in service.method}
    return found


@pytest.mark.parametrize(("proto", "serialized"), [("open_inference_grpc.proto", compiled.OPEN_INFERENCE),
                                                   ("health.proto", compiled.HEALTH)])
def test_the_compiled_descriptors_are_the_proto_files(proto, serialized):
    """compiled.py is what dev/grpc_protos.py writes from the .proto files: regenerate it after
    editing one."""
    file = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    text = (ROOT / "sota_serve" / "grpc" / proto).read_text()
    assert file.name == proto and file.package == re.search(r"^package ([\w.]+);", text, re.M).group(1)
    declared = _proto_declarations(text)
    assert len(declared) > 10
    assert _descriptor_declarations(file) == declared


def test_the_services_are_the_open_inference_protocol_and_health():
    assert protos.INFERENCE_SERVICE.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in protos.INFERENCE_SERVICE.methods] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
    assert protos.HEALTH_SERVICE.full_name == "grpc.health.v1.Health"
    # Triton's own messages read ours, and ours theirs: the same wire format
    ours = protos.ModelInferRequest(model_name=NAME, raw_input_contents=[b"x"])
    ours.parameters["tta_budget_s"].double_param = 0.5
    theirs = service_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == NAME and theirs.parameters["tta_budget_s"].double_param == 0.5


# --- status codes -----------------------------------------------------------------------------------


def test_each_typed_error_has_its_status_code():
    overloaded = errors.OverloadedError("server busy", retry_after_s=7)
    assert status_of(overloaded) == grpc.StatusCode.UNAVAILABLE and trailers(overloaded) == ((RETRY_AFTER, "7"),)
    assert status_of(errors.BudgetExceededError("late", retry_after_s=2)) == grpc.StatusCode.UNAVAILABLE
    for error in (errors.MalformedRequestError("x"), errors.BadRequestError("x"), errors.InvalidImageError("x"),
                  errors.UnsupportedImageFormatError("x"), errors.ImageGeometryError("x")):
        assert status_of(error) == grpc.StatusCode.INVALID_ARGUMENT and trailers(error) == ()
    assert status_of(errors.ImageTooLargeError("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(TooManyValuesError("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(ModelNotFoundError("x")) == grpc.StatusCode.NOT_FOUND
    assert status_of(errors.PackageError("x")) == grpc.StatusCode.INTERNAL


# --- the codec: raw and typed contents read as REST's JSON and binary bodies -------------------------


def _request(name: str, datatype: str, shape: list[int], **fields) -> object:
    request = protos.ModelInferRequest(model_name=NAME, id="r1", **fields)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request


def test_raw_and_typed_contents_read_as_rest_bodies_do():
    images = [b"\xff\xd8a", b"\x89PNGb"]
    raw = _request("image", "BYTES", [2], raw_input_contents=[encode_bytes(images)])
    raw.parameters["tta"].string_param = "five_crop"
    raw.parameters["tta_fallback"].bool_param = True
    raw.parameters["tta_budget_s"].double_param = 0.25
    top = raw.outputs.add(name="probabilities")
    top.parameters["classification"].int64_param = 2
    typed = _request("image", "BYTES", [2])
    typed.inputs[0].contents.bytes_contents.extend(images)
    got = [read_infer(r, CARD, max_images=8) for r in (raw, typed)]
    assert got[0].images == got[1].images == images and got[0].id == "r1"
    assert got[0].tta == "five_crop" and got[0].classification == 2 and got[0].fallback.budget_s == 0.25
    assert got[0].fallback.enabled is True and got[1].tta is None
    pixels = np.arange(2 * 3 * 32 * 32, dtype=np.uint32).astype(np.uint8).reshape(2, 3, 32, 32)
    as_raw = _request("pixels", "UINT8", [2, 3, 32, 32], raw_input_contents=[pixels.tobytes()])
    as_typed = _request("pixels", "UINT8", [2, 3, 32, 32])
    as_typed.inputs[0].contents.uint_contents.extend(pixels.ravel().tolist())
    for request in (as_raw, as_typed):
        assert np.array_equal(read_infer(request, CARD, max_images=8).pixels, pixels)


@pytest.mark.parametrize(("request_of", "message"), [
    (lambda: _request("image", "BYTES", [1]), r"neither contents.bytes_contents nor raw_input_contents"),
    (lambda: _request("image", "BYTES", [1], raw_input_contents=[b"", b""]), "holds 2 tensors for 1 inputs"),
    (lambda: _request("image", "INT32", [1], raw_input_contents=[b"\x07\x00\x00\x00"]), "must be BYTES"),
    (lambda: _request("img", "BYTES", [1], raw_input_contents=[b""]), "exactly one input"),
    (lambda: _request("pixels", "UINT8", [1, 3, 8, 8], raw_input_contents=[bytes(192)]), r"\[N, 3, 32, 32\]"),
    (lambda: _typed_pixels([256] * 3072), "0..255"),
    (lambda: protos.ModelInferRequest(model_name=NAME), "inputs"),
])
def test_bad_requests_name_what_is_wrong(request_of, message):
    with pytest.raises(errors.MalformedRequestError, match=message):
        read_infer(request_of(), CARD, max_images=8)


def _typed_pixels(values: list[int]) -> object:
    request = _request("pixels", "UINT8", [1, 3, 32, 32])
    request.inputs[0].contents.uint_contents.extend(values)
    return request


def test_typed_contents_past_the_value_bound_are_refused_before_they_are_read():
    request = _request("image", "BYTES", [1])
    request.inputs[0].contents.bytes_contents.extend([b""] * (MAX_VALUES + 1))
    with pytest.raises(TooManyValuesError, match="raw_input_contents"):
        read_infer(request, CARD, max_images=8)


def test_the_rest_codec_reads_the_same_inference():
    head = (b'{"id":"r1","inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":["eA=="]}],'
            b'"parameters":{"tta":"flip"}}')
    request = _request("image", "BYTES", [1], raw_input_contents=[encode_bytes([b"x"])])
    request.parameters["tta"].string_param = "flip"
    assert read_infer(request, CARD, max_images=8) == parse_infer(head, None, CARD, max_images=8)


# --- a real server: tritonclient.grpc against REST -----------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_package, tmp_path_factory):
    """``bentoml serve`` of the tiny package with two workers, HTTP and gRPC: (server, gRPC address)."""
    port = free_port()
    server = Server(tiny_package, home=tmp_path_factory.mktemp("bentoml-home"),
                    env={"SOTA_SERVE_DEVICE": "cpu", "SOTA_SERVE_GRPC_PORT": str(port),
                         "SOTA_SERVE_WORKERS": str(WORKERS), "SOTA_SERVE_MAX_BODY_BYTES": str(LIMIT)})
    try:
        server.wait_ready()
        address = f"127.0.0.1:{port}"
        _wait_serving(address, server)
        yield server, address
    finally:
        server.stop()


def _wait_serving(address: str, server: Server, timeout: float = 60) -> None:
    """Until every worker serves gRPC: each starts it once its own model is loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.output().count("gRPC (Open Inference Protocol, health) on port") >= WORKERS:
            return
        time.sleep(0.2)
    raise TimeoutError(f"gRPC not served by {WORKERS} workers:\n{server.output()[-3000:]}")


@pytest.fixture(scope="module")
def client(served):
    with triton_grpc.InferenceServerClient(served[1]) as c:
        yield c


@pytest.fixture(scope="module")
def rest(served):
    with triton_http.InferenceServerClient(served[0].url.removeprefix("http://")) as c:
        yield c


def _stub(address: str) -> tuple[grpc.Channel, service_pb2_grpc.GRPCInferenceServiceStub]:
    """A channel of its own (a new connection) and Triton's own stub on it."""
    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1),
                                                      ("grpc.max_send_message_length", -1)])
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _images(module, files: list[bytes]):
    tensor = module.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
    return tensor


def _code(e: InferenceServerException) -> str:
    return e.status().removeprefix("StatusCode.")


@pytest.mark.slow
def test_health_and_metadata_answer_as_rest(client, rest, served):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, "1")
    assert client.get_server_metadata(as_json=True) == {
        "name": "sota-serve", "version": rest.get_server_metadata()["version"],
        "extensions": ["classification", "binary_tensor_data"]}
    meta = client.get_model_metadata(NAME, as_json=True)
    for tensor in meta["inputs"] + meta["outputs"]:  # int64 travels as a string in protobuf's JSON
        tensor["shape"] = [int(s) for s in tensor["shape"]]
    assert meta == rest.get_model_metadata(NAME)
    for call in (lambda: client.get_model_metadata("another-model"), lambda: client.is_model_ready("another-model"),
                 lambda: client.get_model_metadata(NAME, "2")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert _code(e.value) == "NOT_FOUND"
    with pytest.raises(InferenceServerException, match="no model 'another-model' here; this server serves 'tiny-cnn'"):
        client.get_model_metadata("another-model")
    rest_error = httpx.get(f"{served[0].url}/v2/models/another-model").json()["error"]
    with pytest.raises(InferenceServerException, match=re.escape(rest_error)):
        client.infer("another-model", [_images(triton_grpc, [b"x"])])


@pytest.mark.slow
def test_the_health_service_says_serving(served):
    channel = grpc.insecure_channel(served[1])
    request = protos.message("grpc.health.v1.HealthCheckRequest")
    response = protos.HealthCheckResponse
    check = channel.unary_unary("/grpc.health.v1.Health/Check", request.SerializeToString, response.FromString)
    serving = response.SERVING
    assert check(request(service="")).status == serving
    assert check(request(service="inference.GRPCInferenceService")).status == serving
    with pytest.raises(grpc.RpcError) as e:
        check(request(service="another.Service"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "another.Service" in e.value.details()
    listed = channel.unary_unary("/grpc.health.v1.Health/List", protos.message("grpc.health.v1.HealthListRequest")
                                 .SerializeToString, protos.message("grpc.health.v1.HealthListResponse").FromString)
    statuses = listed(protos.message("grpc.health.v1.HealthListRequest")()).statuses
    assert {name: s.status for name, s in statuses.items()} == {"": serving, "inference.GRPCInferenceService": serving}
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch", request.SerializeToString, response.FromString)
    stream = watch(request(service=""))
    assert next(stream).status == serving
    stream.cancel()
    channel.close()


def _rest_probs(rest, files: list[bytes], tta: str) -> np.ndarray:
    return rest.infer(NAME, [_images(triton_http, files)], parameters={"tta": tta}).as_numpy("probabilities")


@pytest.mark.slow
@pytest.mark.parametrize("tta", ["none", "five_crop"])
def test_model_infer_equals_rest_infer(client, rest, photos, tta):
    files = [p.read_bytes() for p in photos]
    result = client.infer(NAME, [_images(triton_grpc, files)], parameters={"tta": tta}, request_id="r7")
    response = result.get_response(as_json=True)
    assert response["parameters"] == {"tta": {"string_param": tta}, "requested_tta": {"string_param": tta}}
    assert response["id"] == "r7" and response["model_name"] == NAME and response["model_version"] == "1"
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (len(files), len(LABELS))
    np.testing.assert_allclose(got, _rest_probs(rest, files, tta), atol=1e-6, rtol=0)
    top2 = [triton_grpc.InferRequestedOutput("probabilities", class_count=2)]
    strings = client.infer(NAME, [_images(triton_grpc, files)], parameters={"tta": tta}, outputs=top2)
    rest_strings = rest.infer(NAME, [_images(triton_http, files)], parameters={"tta": tta},
                              outputs=[triton_http.InferRequestedOutput("probabilities", class_count=2)])
    labels = [[s.split(b":", 2)[1:] for s in row] for row in strings.as_numpy("probabilities")]
    assert labels == [[s.split(b":", 2)[1:] for s in row] for row in rest_strings.as_numpy("probabilities")]


@pytest.mark.slow
def test_pixels_raw_and_typed_equal_rest(client, rest, served, tiny_package, photos):
    pre = Preprocessor.from_card(ModelCard.load(tiny_package / "card.json"))
    pixels = np.concatenate([pre(p.read_bytes()) for p in photos])
    tensor = triton_grpc.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)  # raw_input_contents
    got = client.infer(NAME, [tensor]).as_numpy("probabilities")
    rest_tensor = triton_http.InferInput("pixels", list(pixels.shape), "UINT8")
    rest_tensor.set_data_from_numpy(pixels)
    np.testing.assert_allclose(got, rest.infer(NAME, [rest_tensor]).as_numpy("probabilities"), atol=1e-6, rtol=0)
    typed = service_pb2.ModelInferRequest(model_name=NAME)
    typed.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape)).contents.uint_contents.extend(
        pixels.ravel().tolist())
    channel, stub = _stub(served[1])
    with channel:
        answer = stub.ModelInfer(typed)
    from_typed = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(len(photos), len(LABELS))
    np.testing.assert_allclose(from_typed, got, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_bad_input_is_invalid_argument_with_rest_s_message(client, rest, photos):
    jpeg = photos[0].read_bytes()
    cases = [  # (images, parameters, message): each sent to both
        ([jpeg, b"not an image"], {}, "image 1 of 2: the bytes are not a recognised image"),
        ([jpeg], {"tta": "twenty_crop"}, "unknown tta"),
        ([jpeg], {"tta_budget_s": "soon"}, "parameter tta_budget_s must be a number"),
        ([jpeg[:3000]], {}, "image 0 of 1"),
    ]
    for files, parameters, message in cases:
        with pytest.raises(InferenceServerException, match=message) as e:
            client.infer(NAME, [_images(triton_grpc, files)], parameters=parameters)
        assert _code(e.value) == "INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException) as r:
            rest.infer(NAME, [_images(triton_http, files)], parameters=parameters)
        assert r.value.status() == "400" and r.value.message() == e.value.message()
    wrong_dtype = triton_grpc.InferInput("image", [1], "INT32")
    wrong_dtype.set_data_from_numpy(np.array([7], np.int32))
    with pytest.raises(InferenceServerException, match="input 'image' must be BYTES") as e:
        client.infer(NAME, [wrong_dtype])
    assert _code(e.value) == "INVALID_ARGUMENT" and client.is_server_ready()


def _at_size(size: int) -> service_pb2.ModelInferRequest:
    """A ModelInfer request of exactly ``size`` bytes: a PNG, padded after its end."""
    png = encode(gradient_image(40, 40))
    request = service_pb2.ModelInferRequest(model_name=NAME)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    padding = size - len(png)
    for _ in range(8):  # the length prefixes grow with the padding: settle on the exact size
        request.ClearField("raw_input_contents")
        request.raw_input_contents.append(encode_bytes([png + b"\x00" * padding]))
        padding += size - request.ByteSize()
    assert request.ByteSize() == size
    return request


@pytest.mark.slow
def test_a_message_at_the_body_limit_is_served_and_one_byte_more_is_resource_exhausted(served):
    channel, stub = _stub(served[1])
    with channel:
        answer = stub.ModelInfer(_at_size(LIMIT))
        assert answer.outputs[0].shape == [1, len(LABELS)]
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(_at_size(LIMIT + 1))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(LIMIT) in e.value.details()


@pytest.mark.slow
def test_a_strict_budget_refused_is_unavailable_with_the_retry_delay(served, rest, photos):
    """What REST answers 503 with Retry-After: not even tta 'none' fits a 1 us budget."""
    strict = {"tta": "five_crop", "tta_fallback": True, "tta_budget_strict": True, "tta_budget_s": 1e-6}
    request = service_pb2.ModelInferRequest(model_name=NAME, raw_input_contents=[encode_bytes([photos[0].read_bytes()])])
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    for name, value in strict.items():
        parameter = request.parameters[name]
        if isinstance(value, str):
            parameter.string_param = value
        elif isinstance(value, bool):
            parameter.bool_param = value
        else:
            parameter.double_param = value
    channel, stub = _stub(served[1])
    with channel, pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(e.value.trailing_metadata())[RETRY_AFTER].isdigit()
    with pytest.raises(InferenceServerException) as r:
        rest.infer(NAME, [_images(triton_http, [photos[0].read_bytes()])], parameters=strict)
    assert r.value.status() == "503"
    same = "not even tta 'none' can be answered within the 1e-06 s budget now"
    assert e.value.details().startswith(same) and r.value.message().startswith(same)


_HOSTILE = [(name, files["image"][1], status) for name, files, _, status in CORPUS
            if files and "image" in files and files["image"][0] is not None]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "data", "status"), _HOSTILE, ids=[h[0] for h in _HOSTILE])
def test_hostile_uploads_as_bytes_get_rest_s_status_and_the_server_serves_on(served, name, data, status):
    channel, stub = _stub(served[1])
    request = service_pb2.ModelInferRequest(model_name=NAME, raw_input_contents=[encode_bytes([data])])
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    with channel:
        try:
            stub.ModelInfer(request, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert e.details(), name
        assert code == CODES[status], name
        assert stub.ServerReady(service_pb2.ServerReadyRequest()).ready


@pytest.mark.slow
def test_every_worker_serves_the_port_and_calls_are_counted_by_method_and_code(served):
    server, address = served

    def count(method: str, code: str) -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        found = re.search(rf'^sota_serve_grpc_requests_total{{code="{code}",method="{method}"}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    before = count("ModelInfer", "INVALID_ARGUMENT"), count("ServerLive", "OK")
    bad = service_pb2.ModelInferRequest(model_name=NAME, raw_input_contents=[encode_bytes([b"not an image"])])
    bad.inputs.add(name="image", datatype="BYTES", shape=[1])
    calls = 16
    for _ in range(calls):  # each on a connection of its own: the kernel spreads them over the workers
        channel, stub = _stub(address)
        with channel:
            assert stub.ServerLive(service_pb2.ServerLiveRequest()).live
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(bad)
    assert (count("ModelInfer", "INVALID_ARGUMENT"), count("ServerLive", "OK")) == (before[0] + calls,
                                                                                    before[1] + calls)
    workers = set(re.findall(r"\[entry_service:sota_serve:(\d+)\] gRPC ModelInfer -> INVALID_ARGUMENT",
                             server.output()))
    assert workers == {str(w) for w in range(1, WORKERS + 1)}


def _doc_example() -> str:
    text = (ROOT / "docs" / "open-inference-protocol.md").read_text()
    section = text.split("\n## gRPC\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_documented_example_runs(served, monkeypatch):
    """The docs' tritonclient.grpc example, on this server's port and model."""
    code = _doc_example()
    assert "localhost:8001" in code and "digits-xresnet18" in code
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("localhost:8001", served[1]).replace("digits-xresnet18", NAME), {})
    printed = out.getvalue()
    assert printed.startswith("True ['1']") and "\nfive_crop [[" in printed
    assert "StatusCode.INVALID_ARGUMENT unknown tta 'twenty_crop'" in printed


@pytest.mark.slow
def test_a_grpc_port_held_by_another_program_stops_the_server_with_one_line(tiny_package, tmp_path):
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = Server(tiny_package, home=tmp_path, env={"SOTA_SERVE_DEVICE": "cpu", "SOTA_SERVE_GRPC_PORT": str(port)})
        try:
            assert server.proc.wait(timeout=120) != 0
            output = server.output()
        finally:
            server.stop()
    assert f"sota-serve: cannot serve: SOTA_SERVE_GRPC_PORT={port} is in use by another program" in output
    assert "Traceback" not in output
