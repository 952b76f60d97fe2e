"""The benchmark's quick mode runs end to end (no timing is asserted)."""

import json
import os

import pytest

from bench.cli import main_args
from bench.report import dumps, markdown, render


@pytest.mark.slow
def test_quick_benchmark_writes_table_json_and_plot(tmp_path, capsys):
    policies = ["none", "flip", "five_crop", "ten_crop"]
    import torch

    threads = torch.get_num_threads()
    argv = ["--quick", "--out", str(tmp_path), "--name", "quick", "--tta", ",".join(policies), "--litserve-workers", "2"]
    assert main_args(argv) == 0
    assert torch.get_num_threads() == threads  # the single-threaded TorchScript ceiling leaves torch as it was
    out = capsys.readouterr().out
    assert "model ceiling" in out and "offline pipeline" in out and "HTTP under closed-loop load" in out
    assert "cost of each TTA policy" in out
    text = (tmp_path / "quick.json").read_text()
    results = json.loads(text, parse_constant=_refuse)  # strict JSON: no NaN or Infinity
    assert {"cpu", "cpu_features"} <= set(results["machine"])
    for key in ("ratio_http_to_offline", "ratio_http_to_offline_five_crop", "ratio_to_naive", "machine",
                "http_img_per_s_plain", "http_img_per_s_five_crop", "ceiling_img_per_s", "ratio_to_litserve"):
        assert key in results
    assert results["http_img_per_s_plain"] > 0 and results["ceiling_img_per_s"] > 0
    model = results["models"][0]
    assert {r["service"] for r in model["http"]} == {"sota-serve", "naive", "litserve"}
    assert {r["workers"] for r in model["http"] if r["service"] == "litserve"} == {2}
    assert model["ratios"]["litserve_best_workers"] == 2
    # The ceiling is measured as the server splits the cores, and as one call over all of them.
    cores = os.cpu_count() or 1
    assert {(r["model_threads"], r["threads"]) for r in model["ceiling"]} == (
        {(1, None), (cores, 1)} if cores > 1 else {(1, None)})
    assert {r["model_threads"] for r in model["offline"]} == {cores}
    assert {r["threads"] for r in model["offline"]} == {2 * cores}  # the server's decode threads
    assert {r["tta"] for r in model["http"] if r["service"] == "sota-serve"} == set(policies)
    per_policy = model["ratios"]["per_policy"]
    assert list(per_policy) == policies
    assert [v["model_calls_per_image"] for v in per_policy.values()] == [1, 2, 5, 10]
    assert all(v["offline_img_per_s"] > 0 and v["http_req_per_s"] > 0 for v in per_policy.values())
    assert all(r["errors"] == 0 and r["ok"] > 0 for r in model["http"])
    assert (tmp_path / "quick.png").stat().st_size > 1000


def test_results_name_packages_by_their_card_not_by_where_they_lay():
    from pathlib import Path

    from bench.report import model_fields

    assert model_fields("demo", "digits-xresnet18:1") == {"model": "demo", "card": "digits-xresnet18:1"}
    assert model_fields("/tmp/mine", "mine:2") == {"model": "mine:2", "card": "mine:2"}
    results = Path(__file__).resolve().parents[1] / "bench" / "results"

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    for path in sorted(results.glob("*.json")):
        absolute = [s for s in strings(json.loads(path.read_text())) if s.startswith(("/", "~"))]
        assert not absolute, f"{path.name} records paths of the machine that measured it: {absolute}"


def _refuse(constant: str) -> None:
    raise AssertionError(f"the results JSON holds {constant}, which strict JSON parsers refuse")


def test_results_without_a_peer_are_strict_json_and_still_render():
    """--no-naive / --no-litserve leave ratios with nothing to divide by: they are written as
    null (not NaN, which jq and JavaScript refuse) and shown as "-"."""
    nan = float("nan")
    ratios = {"to_litserve": 1.34, "to_litserve_five_crop": nan, "http_to_offline": 0.9,
              "http_to_offline_five_crop": nan, "to_naive": nan, "per_policy": {}}
    model = {"model": "demo", "input": "64x64", "ceiling": [], "offline": [],
             "time_per_image_single_thread": {},
             "http": [{"service": "sota-serve", "tta": "none", "concurrency": 1, "throughput": 0.0,
                       "p50_ms": nan, "p95_ms": nan, "p99_ms": nan, "errors": 0}],
             "ratios": ratios}
    text = dumps({"ratio_to_naive": nan, "models": [model]})
    back = json.loads(text, parse_constant=_refuse)
    assert back["ratio_to_naive"] is None and back["models"][0]["ratios"]["to_litserve"] == 1.34
    assert back["models"][0]["http"][0]["p99_ms"] is None
    for shown in (render({"models": [model]}), markdown(back)):
        assert "1.34x" in shown and "nan" not in shown.lower() and "None" not in shown


def test_cpu_info_names_the_model_and_the_features_that_move_int8(tmp_path):
    """Results from two CPUs of one name (AMD EPYC with and without VNNI) must be told apart."""
    from bench.run import cpu_info

    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
             "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 {extra}\n\n")
    fake = tmp_path / "cpuinfo"
    fake.write_text(block.format(n=0, extra="") + block.format(n=1, extra="amx_int8"))
    info = cpu_info(fake)
    assert info == {"cpu": "AMD EPYC, family 25 model 17", "cpu_features": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]}
    assert markdown({"machine": {"cpus": 2, "device": "cpu", **info}, "models": []}).startswith(
        "Machine: 2 CPUs (AMD EPYC, family 25 model 17; avx2 avx512f avx512_vnni avx512_bf16), device cpu.")
    elsewhere = cpu_info(tmp_path / "absent")  # not Linux: what platform knows, no features
    assert isinstance(elsewhere["cpu"], str) and elsewhere["cpu_features"] == []
    # results written before the CPU was recorded still render
    assert markdown({"machine": {"cpus": 2, "device": "cpu"}, "models": []}).startswith("Machine: 2 CPUs, device cpu.")


@pytest.mark.slow
def test_alternating_rounds_against_litserve(tmp_path, capsys):
    """bench.ab: every server answers every round; a round's ratio is against the best LitServe
    configuration of that round, and the headline is the median of those. With --offline the
    offline pipeline runs in every round too."""
    from bench.ab import main

    argv = ["--model", "tiny", "--tta", "none", "--concurrency", "4", "--rounds", "2", "--seconds", "1",
            "--warmup", "0.5", "--litserve-workers", "1,2", "--baseline-env", "SOTA_SERVE_MODEL_THREADS=1",
            "--offline", "--out", str(tmp_path), "--name", "ab"]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "ratio to best" in shown and "ratio to baseline" in shown and "HTTP / offline" in shown
    assert shown.startswith("machine: ")
    result = json.loads((tmp_path / "ab.json").read_text(), parse_constant=_refuse)
    assert result["model"] == "tiny" and result["card"].startswith("tiny") and "package" not in result
    none = result["policies"]["none"]
    peers = ("litserve", "litserve (2 workers)")
    baseline = "sota-serve (SOTA_SERVE_MODEL_THREADS=1)"
    assert none["baseline"] == baseline and len(none["ratios_to_baseline"]) == 2
    assert [len(none["rounds"][s]) for s in ("sota-serve", baseline, *peers)] == [2, 2, 2, 2]
    assert all(r["throughput"] > 0 and r["errors"] == 0 for rs in none["rounds"].values() for r in rs)
    by_peer = none["ratios_by_peer"]
    assert sorted(by_peer) == sorted(peers)
    assert none["ratios"] == [min(a, b) for a, b in zip(*by_peer.values(), strict=True)]
    assert none["median_ratio"] == pytest.approx(sum(none["ratios"]) / 2)
    offline = none["rounds"]["offline pipeline (img/s)"]
    assert len(offline) == 2 and all(r["throughput"] > 0 for r in offline)
    assert none["ratios_to_offline"] == [a["throughput"] / b["throughput"]
                                         for a, b in zip(none["rounds"]["sota-serve"], offline, strict=True)]


def test_gil_probe_times_each_operation_alone_and_beside_a_busy_thread(tmp_path, capsys):
    from dev.probes import gil_probe

    assert gil_probe.main(["--repeats", "20", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gil-probe.json").read_text())
    assert {r["operation"] for r in data["rows"]} == set(gil_probe._operations())
    assert all(r["alone_us"] > 0 and r["with_busy_thread_us"] > 0 for r in data["rows"])
    assert "| join 16 crops of 224 px" in capsys.readouterr().out
