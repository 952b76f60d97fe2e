"""House rules that a reader can check: ruff (with a complexity limit) and the import direction."""

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import python_sources

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    out = subprocess.run([str(Path(sys.executable).parent / "ruff"), "check", "sota_serve", "training", "bento",
                          "rayserve", "bench", "dev", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_imports_neither_training_nor_bento():
    for path in python_sources("sota_serve"):
        text = path.read_text()
        for banned in ("import training", "from training", "import bento", "from bento", "import rayserve",
                       "from rayserve", "import ray", "from ray", "import fastai",
                       "from fastai", "import bench", "from bench"):
            assert banned not in text, f"{path.relative_to(ROOT)} has {banned!r}"


def test_one_definition_of_the_imagenet_stats():
    sources = python_sources("sota_serve", "training", "bento", "bench")
    hits = [p for p in sources if "0.485, 0.456, 0.406" in p.read_text()]
    assert [p.relative_to(ROOT).as_posix() for p in hits] == ["sota_serve/constants.py"]


def test_training_and_bento_meet_only_in_the_core():
    """training -> sota_serve <- bento (and rayserve), nothing between the rooms: the two
    front ends share the HTTP layer through the core (sota_serve.http), not each other."""
    rooms = {"training": ("bento", "rayserve", "bench"), "bento": ("training", "rayserve", "bench"),
             "rayserve": ("training", "bento", "bench")}
    for room, banned_rooms in rooms.items():
        for path in python_sources(room):
            text = path.read_text()
            for other in banned_rooms:
                for banned in (f"import {other}", f"from {other}"):
                    assert banned not in text, f"{path.relative_to(ROOT)} has {banned!r}"


def _project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _extra_closure(extras: set[str]) -> set[str]:
    """``extras`` with the extras they name of the project itself (``sota-serve[http,cpu]``)."""
    optional = _project()["optional-dependencies"]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra not in seen:
            seen.add(extra)
            for line in optional[extra]:
                if _requirement_name(line) == "sota-serve":
                    todo += re.search(r"\[([^\]]*)\]", line).group(1).split(",")
    return seen


def _packages(*extras: str) -> set[str]:
    """The requirement lines of the core and ``extras`` (expanded), the project's own left out."""
    project = _project()
    optional = project["optional-dependencies"]
    lines = set(project["dependencies"])
    for extra in _extra_closure(set(extras)):
        lines |= {d for d in optional[extra] if _requirement_name(d) != "sota-serve"}
    return lines


RUNTIMES = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}


def test_bentofiles_take_their_packages_from_pyproject():
    import yaml

    optional = _project()["optional-dependencies"]
    assert optional["serve"] == ["sota-serve[http,cpu]"] and optional["serve-gpu"] == ["sota-serve[http,gpu]"]
    # the serving install's packages; bentoml is the Bento's own, uv only builds it
    def serving(extra: str) -> set[str]:
        return {d for d in _packages(extra) if _requirement_name(d) not in ("bentoml", "uv")}

    assert any(d.startswith("uvloop") for d in serving("serve")), "the serve extra brings uvicorn's C loop"
    for bentofile, extra in (("bentofile.yaml", "serve"), ("bentofile.gpu.yaml", "serve-gpu")):
        packages = set(yaml.safe_load((ROOT / bentofile).read_text())["python"]["packages"])
        assert packages == serving(extra), f"{bentofile} must list pyproject's core dependencies and the" \
                                           f" {extra} extra's runtime packages"
    extra = set(optional["torchscript"])
    for variant in ("bentofile.torchscript.yaml", "bentofile.pt2.yaml"):
        torch_packages = set(yaml.safe_load((ROOT / variant).read_text())["python"]["packages"])
        assert serving("serve") <= torch_packages <= serving("serve") | extra and torch_packages & extra, variant


def test_only_the_runtime_extras_name_a_runtime():
    """`cpu` and `gpu` each bring one ONNX Runtime build, `serve` and `serve-gpu` one of them, and
    no other extra brings either: any other extra combines with `cpu` or `gpu` without putting
    both builds (which overwrite each other's files) into one environment."""
    optional = _project()["optional-dependencies"]
    assert not {_requirement_name(d) for d in _project()["dependencies"]} & set(RUNTIMES.values())
    for extra in optional:
        closure = _extra_closure({extra})
        names = {_requirement_name(d) for e in closure for d in optional[e]}
        brought = {runtime for key, runtime in RUNTIMES.items() if runtime in names}
        want = {RUNTIMES[key] for key in RUNTIMES if key in closure}
        assert brought == want and len(brought) <= 1, f"[{extra}] brings {sorted(brought)}"


def _documented_installs() -> list[tuple[str, str]]:
    """(file, extras) of every `pip install ... [extras]` of the project in the README and docs."""
    installs = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in path.read_text().splitlines():
            if "pip install" in line:
                installs += [(path.name, m) for m in re.findall(r"(?:sota-serve|'\.|\.)\[([a-z0-9,-]+)\]", line)]
    return installs


def test_every_documented_install_brings_one_runtime():
    """Not both builds (they overwrite each other's files), and not none: the extras beside the
    runtime ones leave the choice to the install command."""
    installs = _documented_installs()
    assert {"serve", "serve-gpu"} <= {extras for _, extras in installs}, installs
    for where, extras in installs:
        runtimes = _extra_closure(set(extras.split(","))) & set(RUNTIMES)
        assert len(runtimes) == 1, f"{where}: pip install [{extras}] brings {sorted(runtimes) or 'no'} ONNX Runtime"


def test_each_torch_bentofile_serves_its_own_backend():
    """bentofile.<backend>.yaml names bento/service_<backend>.py and sets SOTA_SERVE_BACKEND to
    that backend, both in the Bento's environment and before the service module reads it."""
    import yaml

    for backend in ("torchscript", "pt2"):
        bentofile = yaml.safe_load((ROOT / f"bentofile.{backend}.yaml").read_text())
        assert bentofile["service"] == f"bento.service_{backend}:SotaServe"
        assert {"name": "SOTA_SERVE_BACKEND", "value": backend} in bentofile["envs"]
        assert f'setdefault("SOTA_SERVE_BACKEND", "{backend}")' in (ROOT / f"bento/service_{backend}.py").read_text()


def test_the_libraries_the_project_builds_on_have_upper_bounds():
    """A fresh clone installs the series the suite passed with; a new major or minor series of
    these changes numerics (torch, ONNX Runtime) or serving internals (BentoML)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [d for extra in project["optional-dependencies"].values()
                                              for d in extra]
    capped = {re.split(r"[<>=!~;\[ ]", d)[0] for d in requirements if "<" in d.split(";")[0]}
    assert {"torch", "torchvision", "fastai", "bentoml", "onnxruntime", "onnxruntime-gpu", "onnx"} <= capped, capped


def test_the_gpu_bentofile_is_the_default_one_with_the_cuda_build():
    """bentofile.gpu.yaml is bentofile.yaml with onnxruntime-gpu (and its CUDA and cuDNN wheels)
    in place of onnxruntime, on the same base image: no CUDA base image, nothing from a registry
    but the package index."""
    import yaml

    default = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    gpu = yaml.safe_load((ROOT / "bentofile.gpu.yaml").read_text())
    for bentofile in (default, gpu):
        assert "cuda_version" not in (bentofile.get("docker") or {})
    packages = {"default": default["python"].pop("packages"), "gpu": gpu["python"].pop("packages")}
    assert gpu == default
    runtime = {key: [p for p in value if _requirement_name(p).startswith("onnxruntime")]
               for key, value in packages.items()}
    assert [_requirement_name(p) for p in runtime["default"]] == ["onnxruntime"]
    assert [_requirement_name(p) for p in runtime["gpu"]] == ["onnxruntime-gpu"]
    assert "[cuda,cudnn]" in runtime["gpu"][0]
    assert [p for p in packages["gpu"] if p not in runtime["gpu"]] == \
        [p for p in packages["default"] if p not in runtime["default"]]


def _sources(*rooms: str) -> list[Path]:
    return python_sources(*rooms)


def _imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_public_apis_only():
    """No private BentoML or Ray module, no circus (BentoML's process manager)."""
    for path in _sources("sota_serve", "bento", "rayserve", "training", "bench"):
        for name in _imported(ast.parse(path.read_text())):
            root = name.split(".")[0]
            assert root not in ("_bentoml_impl", "_bentoml_sdk", "circus") and not name.startswith(
                "bentoml._internal") and "._private" not in name, f"{path.relative_to(ROOT)} imports {name}"


def _library(module: str) -> bool:
    """A third-party module: neither the project's nor the standard library's (whose typing
    names, such as argparse._SubParsersAction, are stable)."""
    return module.split(".")[0] not in PROJECT and module.split(".")[0] not in sys.stdlib_module_names


def _third_party_names(tree: ast.AST) -> set[str]:
    """The names a module binds to third-party modules or their members."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if _library(a.name)}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _library(node.module):
            names |= {a.asname or a.name for a in node.names}
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_names_of_a_library_imported_or_reached():
    """``from bentoml import _x`` and ``bentoml.server._x`` reach as far into a library as a
    private module does; neither is in its public API."""
    for path in _sources("sota_serve", "bento", "rayserve", "training", "bench"):
        tree = ast.parse(path.read_text())
        where = path.relative_to(ROOT)
        libraries = _third_party_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _library(node.module):
                private = [a.name for a in node.names if _private(a.name)]
                assert not private, f"{where}:{node.lineno} imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                assert not (isinstance(base, ast.Name) and base.id in libraries), (
                    f"{where}:{node.lineno} reaches {ast.unparse(node)}")


#: Dunder methods that a library calls by name and documents: BentoML's readiness hook
#: ("Configure lifecycle hooks" in its docs) and pydantic's custom-type hook ("Custom types").
#: Python's own data model needs no entry.
DOCUMENTED_HOOKS = {"__is_ready__", "__get_pydantic_core_schema__", "__get_pydantic_json_schema__"}


def _data_model_names() -> set[str]:
    import collections.abc
    import contextlib

    types = (object, type, int, float, list, dict, set, str, bytes, BaseException, property,
             contextlib.AbstractContextManager, contextlib.AbstractAsyncContextManager,
             collections.abc.Coroutine, collections.abc.AsyncIterator, collections.abc.Iterator,
             collections.abc.Callable, collections.abc.Mapping)
    names = {n for t in types for n in dir(t) if n.startswith("__")}
    return names | {"__post_init__", "__set_name__", "__get__", "__set__", "__delete__", "__missing__",
                    "__getattr__", "__class_getitem__", "__fspath__", "__index__", "__call__", "__buffer__"}


def test_no_undocumented_dunder_hooks():
    """A class may define Python's data-model methods and hooks its library documents; an
    undocumented hook (a name a library happens to look up) breaks on its next release."""
    allowed = _data_model_names() | DOCUMENTED_HOOKS
    for path in _sources("sota_serve", "bento", "rayserve", "training", "bench"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("__") \
                    and node.name.endswith("__"):
                assert node.name in allowed, f"{path.relative_to(ROOT)}:{node.lineno} defines {node.name}"


def test_no_monkeypatching():
    """No assignment to an attribute of an imported module or of a class imported from one:
    an upgrade of the library would undo the patch without a word."""
    for path in _sources("sota_serve", "bento", "rayserve", "training", "bench"):
        tree = ast.parse(path.read_text())
        imported = {(a.asname or a.name).split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import | ast.ImportFrom) and getattr(node, "level", 0) == 0
                    and not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0]
                             in PROJECT) and not (isinstance(node, ast.Import) and a_project(node))
                    for a in node.names}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else [])
            for target in targets:
                if isinstance(target, ast.Attribute):
                    base = target.value
                    while isinstance(base, ast.Attribute):
                        base = base.value
                    assert not (isinstance(base, ast.Name) and base.id in imported)\
                        or ast.unparse(target) in SETTINGS, (
                        f"{path.relative_to(ROOT)}:{node.lineno} assigns {ast.unparse(target)}")
        for node in ast.walk(tree):  # setattr(module_or_class, ...)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
                first = node.args[0]
                assert not (isinstance(first, ast.Name) and first.id in imported), (
                    f"{path.relative_to(ROOT)}:{node.lineno} setattr on {first.id}")


PROJECT = ("sota_serve", "bento", "rayserve", "training", "bench")
#: module attributes documented as settings to assign (Pillow's, Python's hook for uncaught
#: exceptions), not patches of a library's code
SETTINGS = {"ImageFile.LOAD_TRUNCATED_IMAGES", "Image.MAX_IMAGE_PIXELS", "sys.excepthook"}


def a_project(node: ast.Import) -> bool:
    return all(a.name.split(".")[0] in PROJECT for a in node.names)


def test_the_serving_core_has_no_web_framework():
    for path in python_sources("sota_serve"):
        for name in _imported(ast.parse(path.read_text())):
            root = name.split(".")[0]
            assert root not in ("bentoml", "starlette", "fastapi", "uvicorn", "litserve", "flask", "aiohttp",
                                "ray"), (
                f"{path.relative_to(ROOT)} imports {name}")


def test_the_service_file_reads_at_a_glance():
    assert len((ROOT / "bento" / "service.py").read_text().splitlines()) < 120


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement)[0].lower().replace("_", "-")


def test_every_library_the_code_imports_is_declared():
    """A third-party module imported by the shipped code (sota_serve, bento, rayserve, training)
    comes from a distribution pyproject.toml names, in the core or an extra: one that only
    arrives as another package's dependency can vanish with that package's next release."""
    import importlib.metadata
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(d) for d in project["dependencies"]}
    declared |= {_requirement_name(d) for extra in project["optional-dependencies"].values() for d in extra}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for path in _sources("sota_serve", "bento", "rayserve", "training"):
        for name in _imported(ast.parse(path.read_text())):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in PROJECT:
                continue
            dists = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
            if not dists & declared:
                missing.setdefault(top, path.relative_to(ROOT).as_posix())
    assert not missing, f"imported but not declared in pyproject.toml (module: first file): {missing}"
