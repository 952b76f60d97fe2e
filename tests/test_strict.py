"""The suite's own rules (tests/conftest.py), checked by running pytest inside pytest
(``pytester``) on small test files with the project's hooks loaded:

- with SOTA_SERVE_TEST_STRICT set, as CI sets it, a skip fails the run with the skip's reason;
- ``gpu`` tests are deselected (not skipped) unless ``-m`` names the marker, and fail, saying
  so, where no CUDA device is found.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ("-p", "tests.conftest")
REASON = "no frobnicator here"

SKIPS = {
    # where the skip happens: (the test file, what the strict run reports beside another
    # file's passing test)
    "in the test": (f"""
import pytest
def test_a():
    pytest.skip("{REASON}")
""", {"passed": 1, "failed": 1}),
    "by a marker": (f"""
import pytest
@pytest.mark.skipif(True, reason="{REASON}")
def test_a():
    pass
""", {"passed": 1, "errors": 1}),
    "in a fixture": (f"""
import pytest
@pytest.fixture
def tool():
    pytest.skip("{REASON}")
def test_a(tool):
    pass
""", {"passed": 1, "errors": 1}),
    "at import": (f"""
import pytest
pytest.importorskip("no_frobnicator_module", reason="{REASON}")
def test_a():
    pass
""", {"errors": 1}),  # an error while collecting stops the run before any test
}


@pytest.fixture
def inner(pytester, monkeypatch):
    """A pytester with this suite's markers, and neither setting of the outer run."""
    monkeypatch.delenv("SOTA_SERVE_TEST_STRICT", raising=False)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n    slow: slow\n")
    return pytester


@pytest.mark.parametrize("where", SKIPS)
def test_a_skip_is_a_skip_unless_strict(inner, monkeypatch, where):
    source, strict_outcome = SKIPS[where]
    inner.makepyfile(test_tool=source, test_other="def test_b():\n    pass\n")
    for value in ("", "0"):  # unset or 0: not strict
        if value:
            monkeypatch.setenv("SOTA_SERVE_TEST_STRICT", value)
        result = inner.runpytest(*HOOKS)
        result.assert_outcomes(passed=1, skipped=1)
        assert result.ret == 0
    monkeypatch.setenv("SOTA_SERVE_TEST_STRICT", "1")
    result = inner.runpytest(*HOOKS)
    result.assert_outcomes(**strict_outcome)
    assert result.ret != 0
    result.stdout.fnmatch_lines([f"*SOTA_SERVE_TEST_STRICT=1: a skip fails this run: {REASON}*"])


def test_strict_leaves_passes_failures_and_xfails_as_they_are(inner, monkeypatch):
    inner.makepyfile(test_mixed="""
import pytest
def test_passes():
    pass
def test_fails():
    assert False
@pytest.mark.xfail(reason="known")
def test_xfails():
    assert False
""")
    monkeypatch.setenv("SOTA_SERVE_TEST_STRICT", "1")
    inner.runpytest(*HOOKS).assert_outcomes(passed=1, failed=1, xfailed=1)


GPU_FILE = """
import pytest
@pytest.mark.gpu
def test_on_the_gpu():
    pass
@pytest.mark.slow
def test_slow():
    pass
def test_plain():
    pass
"""


def test_gpu_tests_are_deselected_not_skipped_unless_m_names_them(inner, monkeypatch):
    inner.makepyfile(test_mixed=GPU_FILE)
    monkeypatch.setenv("SOTA_SERVE_TEST_STRICT", "1")
    result = inner.runpytest(*HOOKS)
    result.assert_outcomes(passed=2, deselected=1)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["gpu tests: deselected (run them with -m gpu: make test-gpu)"])
    inner.runpytest(*HOOKS, "-m", "not slow").assert_outcomes(passed=1, deselected=2)  # make test-fast
    inner.runpytest(*HOOKS, "-m", "not gpu").assert_outcomes(passed=2, deselected=1)


def test_gpu_tests_fail_where_no_cuda_device_is_found(inner, monkeypatch):
    """``make test-gpu`` on a machine without a GPU: a fresh process whose driver sees no device
    (CUDA_VISIBLE_DEVICES empty hides any), so that a GPU machine checks this too."""
    inner.makepyfile(test_mixed=GPU_FILE)
    monkeypatch.setenv("SOTA_SERVE_TEST_STRICT", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = inner.runpytest_subprocess(*HOOKS, "-m", "gpu")
    result.assert_outcomes(errors=1, deselected=2)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["gpu tests: as -m says; CUDA devices here: 0",
                                 "*no CUDA device was found*"])
