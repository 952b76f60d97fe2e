"""`pip install 'sota-serve[serve]'` (and the bare core) resolves to wheels on every platform the
project supports: Linux x86-64, Linux aarch64 and macOS on Apple silicon, Python 3.11 to 3.13;
and `sota-serve[serve-gpu]` resolves on Linux x86-64 and aarch64.

pip's resolver is asked against the package index (``--dry-run --report``), with the target's
wheel tags given by ``--platform``, ``--python-version`` and ``--only-binary=:all:``. pip takes
``--platform`` tags literally, so each platform passes every tag a wheel for it may carry: the
manylinux_2_5 to 2_39 tags and their legacy aliases (manylinux1, 2010, 2014), and every macOS
tag that packaging.tags.mac_platforms lists for arm64. The project itself is a wheel built here
(``pip wheel --no-deps``).

pip evaluates environment markers (``sys_platform``, ``platform_machine``, ``python_version``)
against the interpreter that runs it, not against ``--platform`` and ``--python-version``. So
each resolution is checked twice over: the project's own requirements must not depend on the
platform among these three (their markers evaluate alike on all), and every marker of the
resolved packages' own requirements is evaluated again for the target: a requirement the target
needs that the host's evaluation dropped fails the test, naming it, since its wheel was never
looked for.

Needs the package index (PyPI); the resolutions of a test run at once: one to three minutes in all.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.tags import mac_platforms
from packaging.utils import canonicalize_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.11", "3.12", "3.13")
#: the newest macOS whose tags packaging lists; mac_platforms counts down from it to 11.0 and
#: the 10.x universal2 tags that Apple silicon also runs
MACOS = (26, 0)


def _manylinux(arch: str, legacy: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"manylinux_2_{minor}_{arch}" for minor in range(5, 40)) + tuple(
        f"{alias}_{arch}" for alias in legacy)


@dataclass(frozen=True)
class Target:
    """A platform: its wheel tags and the marker values of its interpreters."""

    name: str
    tags: tuple[str, ...]
    sys_platform: str
    platform_system: str
    platform_machine: str

    def environment(self, python: str) -> dict[str, str]:
        return {"sys_platform": self.sys_platform, "platform_system": self.platform_system,
                "platform_machine": self.platform_machine, "os_name": "posix",
                "python_version": python, "python_full_version": f"{python}.0",
                "implementation_name": "cpython", "platform_python_implementation": "CPython",
                "implementation_version": f"{python}.0", "platform_release": "", "platform_version": ""}


LINUX_X86_64 = Target("Linux x86-64", _manylinux("x86_64", ("manylinux1", "manylinux2010", "manylinux2014")),
                      "linux", "Linux", "x86_64")
LINUX_AARCH64 = Target("Linux aarch64", _manylinux("aarch64", ("manylinux2014",)), "linux", "Linux", "aarch64")
MACOS_ARM64 = Target("macOS arm64", tuple(mac_platforms(MACOS, "arm64")), "darwin", "Darwin", "arm64")
TARGETS = (LINUX_X86_64, LINUX_AARCH64, MACOS_ARM64)


@dataclass(frozen=True)
class Resolution:
    target: Target
    python: str
    requirement: str
    returncode: int
    report: dict | None
    stderr: str

    @property
    def where(self) -> str:
        return f"{self.requirement} on {self.target.name}, Python {self.python}"

    def installed(self) -> dict[str, dict]:
        assert self.report is not None
        return {canonicalize_name(item["metadata"]["name"]): item for item in self.report["install"]}


def no_wheel(stderr: str) -> list[str]:
    """The requirements pip found no wheel for, from its error lines."""
    found = re.findall(r"No matching distribution found for (\S+)", stderr)
    found += re.findall(r"Could not find a version that satisfies the requirement (\S+)", stderr)
    return sorted(set(found))


def resolve(wheel: Path, extras: str, target: Target, python: str) -> Resolution:
    requirement = f"sota-serve[{extras}]" if extras else "sota-serve"
    platforms = [option for tag in target.tags for option in ("--platform", tag)]
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", "-", "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
         *platforms, f"{wheel}[{extras}]" if extras else str(wheel)],
        capture_output=True, text=True, timeout=600)
    report = json.loads(out.stdout) if out.returncode == 0 else None
    return Resolution(target, python, requirement, out.returncode, report, out.stderr)


def resolve_all(wheel: Path, jobs: list[tuple[str, Target, str]]) -> list[Resolution]:
    # pip spends its time waiting on the index: the resolutions overlap
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: resolve(wheel, *job), jobs))


def host_environment() -> dict[str, str]:
    from packaging.markers import default_environment

    return dict(default_environment())


def dropped_by_the_host(resolution: Resolution) -> list[str]:
    """Requirements of the resolved packages that the target needs but pip, evaluating markers
    on this host, left out: their wheels were never looked for."""
    target_env, host_env = resolution.target.environment(resolution.python), host_environment()
    installed = resolution.installed()
    dropped = []
    for name, item in installed.items():
        extras = item.get("requested_extras") or []
        for line in item["metadata"].get("requires_dist", []):
            requirement = Requirement(line)
            if requirement.marker is None or canonicalize_name(requirement.name) in installed:
                continue
            for extra in ["", *extras]:
                wanted = requirement.marker.evaluate({**target_env, "extra": extra})
                if wanted and not requirement.marker.evaluate({**host_env, "extra": extra}):
                    dropped.append(f"{line} (of {name})")
    return sorted(set(dropped))


def failures(resolutions: list[Resolution]) -> list[str]:
    said = []
    for r in resolutions:
        if r.returncode != 0:
            missing = no_wheel(r.stderr)
            what = f"no wheel of {', '.join(missing)}" if missing else f"pip failed: {r.stderr.strip()[-1500:]}"
            said.append(f"{r.where}: {what}")
        elif dropped := dropped_by_the_host(r):
            said.append(f"{r.where}: needs {', '.join(dropped)}, which pip on this host did not resolve")
    return said


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir",
                            str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-4000:]
    (path,) = out.glob("sota_serve-*.whl")
    return path


def _project_requirements(*extras: str) -> list[Requirement]:
    """The core's and ``extras``' requirements, the project's own extras expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    lines, todo, seen = list(project["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in optional[extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == "sota-serve":
                todo += sorted(requirement.extras)
            else:
                lines.append(line)
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("extra", ["serve", "serve-gpu"])
def test_the_serving_requirements_mark_no_platform_apart(extra):
    """pip on one host answers for all three only if no marker of the project's own tells
    them apart (uvloop's ``sys_platform != 'win32'`` holds on each)."""
    for requirement in _project_requirements(extra):
        if requirement.marker is None:
            continue
        for python in PYTHONS:
            seen = {t.name: requirement.marker.evaluate(t.environment(python)) for t in TARGETS}
            assert len(set(seen.values())) == 1, f"{requirement}: {seen} on Python {python}"
            host = requirement.marker.evaluate(host_environment())
            assert set(seen.values()) == {host}, f"{requirement}: {seen}, this host {host}"


def test_the_core_and_serve_resolve_on_each_platform_and_python(wheel):
    # serve on each Python; the core, whose every package serve also resolves, on the newest,
    # to check that it resolves without a runtime (pip spends its CPU on tag matching: fewer runs)
    jobs = [("serve", target, python) for target in TARGETS for python in PYTHONS]
    jobs += [("", target, PYTHONS[-1]) for target in TARGETS]
    resolutions = resolve_all(wheel, jobs)
    assert not failures(resolutions), "\n".join(failures(resolutions))
    for r in resolutions:
        installed = r.installed()
        assert "onnxruntime-gpu" not in installed, f"{r.where} brings the CUDA build"
        if r.requirement.endswith("[serve]"):
            assert {"onnxruntime", "bentoml", "uvloop"} <= installed.keys(), f"{r.where}: {sorted(installed)}"
            assert not {"torch", "fastai"} & installed.keys(), f"{r.where}: {sorted(installed)}"
        else:
            assert "onnxruntime" not in installed and "sota-serve" in installed, f"{r.where}: {sorted(installed)}"
    print(f"\nresolved {len(resolutions)}: " + ", ".join(
        f"{r.where} ({len(r.installed())} packages)" for r in resolutions))


def test_serve_gpu_resolves_on_linux(wheel):
    resolutions = resolve_all(wheel, [("serve-gpu", target, python) for target in (LINUX_X86_64, LINUX_AARCH64)
                                      for python in PYTHONS])
    assert not failures(resolutions), "\n".join(failures(resolutions))
    for r in resolutions:
        installed = r.installed()
        assert "onnxruntime-gpu" in installed and "onnxruntime" not in installed, f"{r.where}: {sorted(installed)}"
        # the CUDA runtime and cuDNN from their wheels (onnxruntime-gpu's cuda and cudnn extras)
        assert any(n.startswith("nvidia-cuda-runtime") for n in installed), f"{r.where}: {sorted(installed)}"
        assert any(n.startswith("nvidia-cudnn") for n in installed), f"{r.where}: {sorted(installed)}"
