"""Tables on stdout, JSON and a plot on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: the benchmark's own models, by name (``--model``); any other name is a package directory
MODEL_NAMES = ("demo", "xresnet50", "tiny")


def model_fields(name: str, card_tag: str) -> dict[str, str]:
    """How a result names what it measured: a benchmark model by its name, a package
    directory by its card's tag (name:version), and the card's tag in either case; never by
    where the package lay, a path of the machine that measured, which no reader has."""
    return {"model": name if name in MODEL_NAMES else card_tag, "card": card_tag}


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [f"\n{title}", "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _x(ratio: float | None) -> str:
    return "-" if ratio is None or not math.isfinite(ratio) else f"{ratio:.2f}x"


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as None (no peer, no rows: nothing measured)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps(results: Any) -> str:
    """Strict JSON (RFC 8259 has no NaN; jq and JavaScript refuse it): a ratio without its
    peer, or a percentile without requests, is written as null."""
    return json.dumps(_finite(results), indent=2, allow_nan=False) + "\n"


def _split(r: dict[str, Any]) -> str:
    """"calls at once x intra-op threads" (results before model threads ran one call)."""
    return f"{r.get('model_threads', 1)} x {r.get('threads') or 'all'}"


def service_label(service: str, workers: int = 1) -> str:
    """A server's name in tables: ``litserve``, ``litserve (2 workers)``."""
    return f"{service} ({workers} workers)" if workers > 1 else service


def _service(r: dict[str, Any]) -> str:
    return service_label(r["service"], r.get("workers", 1))


def _ceiling(model: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the model-ceiling table (results before fp16 files were fp32)."""
    return (["backend", "precision", "device", "calls x threads", "batch", "img/s", "ms/batch"],
            [[r["backend"], r.get("precision", "fp32"), r["device"], _split(r), r["batch_size"], r["images_per_s"],
              1000 * r["median_s"]] for r in model["ceiling"]])


def _offline(model: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    return (["tta", "batch", "decode threads", "model calls", "img/s"],
            [[r["tta"], r["batch_size"], r["threads"], r.get("model_threads", 1), r["images_per_s"]]
             for r in model["offline"]])


def machine_line(machine: dict[str, Any], label: str = "machine") -> str:
    """``machine: 2 CPUs (AMD EPYC, family 25 model 17; avx2 avx512_vnni), device cpu``;
    results from before the CPU was recorded say only the count."""
    cpu = machine.get("cpu")
    features = " ".join(machine.get("cpu_features", [])) or "none of the listed features"
    what = f" ({cpu}; {features})" if cpu else ""
    return f"{label}: {machine.get('cpus', '?')} CPUs{what}, device {machine.get('device', '?')}"


def render(results: dict[str, Any]) -> str:
    out = [machine_line(results["machine"])] if "machine" in results else []
    for model in results["models"]:
        name = model["model"]
        out.append(table(f"[{name}] model ceiling (runtime alone, uint8 batches)", *_ceiling(model)))
        decode = model.get("decode", "pillow")
        out.append(table(f"[{name}] offline pipeline (decode with {decode} + preprocess + model, no HTTP)",
                          *_offline(model)))
        rows = [[_service(r), r["tta"], r["concurrency"], r["throughput"], r["p50_ms"], r["p95_ms"],
                 r["p99_ms"], r.get("shed_503", 0), r["errors"]] for r in model["http"]]
        out.append(table(f"[{name}] HTTP under closed-loop load",
                          ["service", "tta", "conc", "req/s", "p50 ms", "p95 ms", "p99 ms", "503", "errors"], rows))
        r = model["ratios"]
        if len(r.get("per_policy", {})) > 1:
            out.append(table(f"[{name}] cost of each TTA policy (best error-free HTTP level)",
                              ["tta", "calls/img", "offline img/s", "vs none", "HTTP req/s", "vs none", "vs LitServe"],
                              [[t, v["model_calls_per_image"], v["offline_img_per_s"], _x(v["offline_vs_none"]),
                                v["http_req_per_s"], _x(v["http_vs_none"]), _x(v["to_litserve"])]
                               for t, v in r["per_policy"].items()]))
        out.append(f"\n[{name}] ratios: vs LitServe {_x(r['to_litserve'])} plain, "
                   f"{_x(r['to_litserve_five_crop'])} five-crop (target >= 1.3); "
                   f"http/offline {_x(r['http_to_offline'])}, five-crop {_x(r['http_to_offline_five_crop'])}"
                   f" (target >= 0.9); vs naive {_x(r['to_naive'])}")
    return "\n".join(out)


def write_json(results: Any, path: Path) -> Path:
    """``results`` as strict JSON at ``path`` (its folder made); prints and returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(results))
    print(f"wrote {path}")
    return path


def write(results: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    written = [write_json(results, out_dir / f"{stem}.json")]
    plot = _plot(results, out_dir / f"{stem}.png")
    if plot:
        print(f"wrote {plot}")
        written.append(plot)
    return written


def _plot(results: dict[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in results["models"] if m["http"]]
    if not models:
        return None
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    for (ax1, ax2), model in zip(axes, models, strict=True):
        series: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in model["http"]:
            series.setdefault((_service(r), r["tta"]), []).append(r)
        for (service, tta), rows in series.items():
            xs = [r["concurrency"] for r in rows]
            label = f"{service} ({tta})"
            ax1.plot(xs, [r["throughput"] for r in rows], marker="o", label=label)
            ax2.plot(xs, [r["p99_ms"] for r in rows], marker="o", label=label)
        for ax, ylabel in ((ax1, "requests/s"), (ax2, "p99 latency (ms)")):
            ax.set_xscale("log", base=2)
            ax.set(xlabel="concurrency", ylabel=ylabel, title=f"{model['model']}: {ylabel}")
            ax.grid(alpha=0.3)
        ax2.set_yscale("log")
        ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _md(header: list[str], rows: list[list[Any]]) -> str:
    fmt = [[_cell(c) for c in row] for row in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in fmt])


def markdown(results: dict[str, Any]) -> str:
    """The tables of BENCHMARKS.md, from a results JSON (``python -m bench.report FILE``)."""
    out = [machine_line(results["machine"], "Machine") + ".", ""] if "machine" in results else []
    for model in results["models"]:
        out += [f"### {model['model']} ({model['input']})", "", "Model ceiling (runtime alone):", "",
                _md(*_ceiling(model)), "", "Offline pipeline (decode + preprocess + model):", "",
                _md(*_offline(model)),
                "", "Single-threaded time per image: " + "; ".join(
                    f"{tta}: decode {v['decode_ms']:.1f} ms, crops {v['preprocess_ms']:.1f} ms, model {v['model_ms']:.1f} ms"
                    for tta, v in model["time_per_image_single_thread"].items()), "",
                "HTTP, closed-loop load:", "",
                _md(["service", "tta", "concurrency", "req/s", "p50 ms", "p95 ms", "p99 ms", "503", "other non-200"],
                    [[_service(r), r["tta"], r["concurrency"], r["throughput"], r["p50_ms"], r["p95_ms"],
                      r["p99_ms"], r.get("shed_503", 0), r["errors"]] for r in model["http"]]), ""]
        r = model["ratios"]
        out += [f"Ratios: sota-serve / LitServe **{_x(r.get('to_litserve'))}** plain,"
                f" **{_x(r.get('to_litserve_five_crop'))}** five-crop (best error-free level of"
                f" each); HTTP / offline **{_x(r.get('http_to_offline'))}**, five-crop"
                f" **{_x(r.get('http_to_offline_five_crop'))}**; sota-serve / naive at <= the naive peer's p99"
                f" **{_x(r.get('to_naive'))}**.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
