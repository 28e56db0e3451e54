"""The kernel tests again, against the kernels built with AddressSanitizer and UndefinedBehaviorSanitizer: a read or
write past a tensor, or undefined arithmetic, in any kernel fails the run instead of passing unseen.

Python itself is not instrumented, so the ASan runtime is preloaded (LD_PRELOAD) into the test process, and a
pytest plugin swaps the sanitized library in for the one `worker.native` would build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker import native_build

REPO = Path(__file__).resolve().parents[2]
# -O1 as the sanitizers' manuals advise: the checks stay, and it compiles in half the time of -O3
SANITIZE = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
PLUGIN = """
import ctypes, os
from worker import native

_sanitized = native.bind(ctypes.CDLL(os.environ["SANITIZED_KERNELS"]))
native.library = lambda: _sanitized
"""
# left to the plain run: the tests that build the library in subprocesses of their own, and those of servers
DESELECT = "not built_once and not switched_off and not failed_build and not status_of and not servers and not worker"


def _runtime(compiler: str, name: str) -> str | None:
    found = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and Path(found).exists() else None


def test_kernel_tests_pass_under_address_and_undefined_behaviour_sanitizers(tmp_path: Path) -> None:
    if not native_build._has_avx512():
        pytest.skip("the kernels need AVX-512 (native.py builds them only there), and this CPU has none")
    compiler = native_build._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    asan = _runtime(compiler, "libasan.so")
    if asan is None:
        pytest.skip(f"{compiler} has no AddressSanitizer runtime (libasan.so)")
    library = tmp_path / "kernels-sanitized.so"
    flags = [flag for flag in native_build.FLAGS if not flag.startswith("-O")]
    command = [compiler, *flags, *native_build.OPENMP, *SANITIZE, "-o", str(library)]
    subprocess.run([*command, *map(str, native_build.SOURCES)], check=True, capture_output=True, timeout=300)
    (tmp_path / "sanitized_kernels.py").write_text(PLUGIN)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]),
        "SANITIZED_KERNELS": str(library),
        "LD_PRELOAD": asan,
        # Python's own allocations are never freed at exit; UBSan reports with a stack and fails the process
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }
    tests = [
        "tests/worker/test_native.py",
        "tests/worker/test_native_prefill.py",
        "tests/reliability/test_native_kernels.py",
    ]
    pytest_args = ["-q", "-x", "-p", "sanitized_kernels", "-p", "no:cacheprovider", "-k", DESELECT, *tests]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *pytest_args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = run.stdout[-4000:] + run.stderr[-8000:]
    assert run.returncode == 0, report
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], report
