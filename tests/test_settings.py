"""Service settings: knobs left unset are sized to the machine, on CPU and (simulated) GPU."""

import pytest

import sota_serve.serving.settings as settings_module
from sota_serve.errors import SotaServeError
from sota_serve.serving.settings import Settings, load_settings


def test_cpu_plan_gives_one_worker_all_cores_as_single_threaded_model_calls(monkeypatch):
    monkeypatch.setattr(settings_module.os, "cpu_count", lambda: 8)
    plan = Settings(device="cpu").plan()
    # two decode threads per core: while one waits for the GIL, the other keeps the core busy
    assert (plan.device, plan.workers, plan.decode_threads) == ("cpu", 1, 16)
    assert (plan.model_threads, plan.threads) == (8, 1)
    assert (plan.max_batch_size, plan.max_batch_size_tta) == (32, 8)


@pytest.mark.parametrize(("given", "split"), [
    ({"threads": 4}, (2, 4)),  # intra-op threads given: the cores left go to calls at once
    ({"model_threads": 2}, (2, 4)),  # calls given: the cores are divided among them
    ({"model_threads": 1}, (1, 8)),  # one call over all cores (the design before model threads)
    ({"model_threads": 3, "threads": 3}, (3, 3)),  # both given: as given, even oversubscribed
    ({"threads": 16}, (1, 16)),
])
def test_cpu_cores_split_between_model_calls_and_intra_op_threads(monkeypatch, given, split):
    monkeypatch.setattr(settings_module.os, "cpu_count", lambda: 8)
    plan = Settings(device="cpu", **given).plan()
    assert (plan.model_threads, plan.threads) == split


def test_gpu_plan_shares_the_device_between_workers(monkeypatch):
    # CI has no GPU: the plan's arithmetic is checked with the device resolution stubbed.
    monkeypatch.setattr(settings_module, "resolve_device", lambda requested: "cuda")
    monkeypatch.setattr(settings_module.os, "cpu_count", lambda: 16)
    plan = Settings().plan()
    assert (plan.device, plan.workers, plan.decode_threads, plan.threads, plan.model_threads) == ("cuda", 8, 2, 1, 1)
    assert (plan.max_batch_size, plan.max_batch_size_tta) == (128, 32)


def test_decoding_on_the_gpu_only_where_it_works(monkeypatch):
    import sota_serve.image.device_preprocess as device_preprocess

    assert Settings().decoder("cuda") == "pillow"  # the default: no torch at all
    assert Settings(decode="torchvision").decoder("cpu") == "torchvision"
    monkeypatch.setattr(device_preprocess, "unavailable_reason", lambda device: "no nvJPEG here")
    with pytest.raises(SotaServeError, match="SOTA_SERVE_DECODE=torchvision: no nvJPEG here"):
        Settings(decode="torchvision").decoder("cuda")
    monkeypatch.setattr(device_preprocess, "unavailable_reason", lambda device: None)
    assert Settings(decode="torchvision").decoder("cuda") == "torchvision"


def test_explicit_settings_win(monkeypatch):
    monkeypatch.setattr(settings_module.os, "cpu_count", lambda: 2)
    plan = Settings(device="cpu", workers=2, decode_threads=3, threads=1, max_batch_size=4).plan()
    assert (plan.workers, plan.decode_threads, plan.threads, plan.max_batch_size) == (2, 3, 1, 4)
    assert Settings(device="cpu", workers=2).plan().decode_threads == 2  # 1 core per worker, 2 threads each


def test_bad_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("SOTA_SERVE_MAX_WAIT_S", "-1")
    with pytest.raises(SotaServeError, match="SOTA_SERVE_MAX_WAIT_S"):
        load_settings()


@pytest.mark.parametrize(("given", "message"), [
    ({"precision": "fp16"}, "SOTA_SERVE_PRECISION=fp16: the package has no fp16 onnx artifact .* export with --fp16"),
    ({"precision": "int8"}, "SOTA_SERVE_PRECISION=int8: the package has no int8 onnx artifact .* sota-serve quantize"),
    ({"precision": "int8", "backend": "torchscript"}, "SOTA_SERVE_PRECISION=int8: .* int8 files are ONNX only"),
])
def test_a_precision_the_package_lacks_is_refused_naming_the_variable(tiny_package, given, message):
    from sota_serve.package.loading import open_package

    package = open_package(tiny_package)
    settings = Settings(device="cpu", **given)
    with pytest.raises(SotaServeError, match=message):
        settings.check(package, settings.plan())


def test_settings_the_package_and_machine_serve_pass_the_check(tiny_package):
    from sota_serve.package.loading import open_package

    package = open_package(tiny_package)
    for given in ({}, {"precision": "fp32"}, {"backend": "pt2"}, {"decode": "torchvision"}):
        settings = Settings(device="cpu", **given)
        settings.check(package, settings.plan())
