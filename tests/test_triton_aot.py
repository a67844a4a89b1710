"""Every Triton kernel builds ahead of time for NVIDIA and AMD GPUs, on a machine with none.

Each module of ``seerattn_r.kernels.triton`` that defines ``aot_configs()`` lists the builds
its launcher can ask for (see ``_common.AotConfig``); each is compiled with triton's own
ptxas / LLVM for sm_80, sm_90, gfx942 and gfx90a. A build passes when it compiles, fits the
target's shared memory (LDS), and, where it multiplies tiles, uses the matrix cores
(mma/wgmma in the PTX, mfma in the AMDGCN).

The interpreter (``TRITON_INTERPRET=1``, how CI runs the suite) replaces jit functions, so
the builds run in one subprocess without it, in parallel, before the checks read its report.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

# (backend, arch, warp size) and the most shared memory a program may use there (bytes):
# A100's 163 KiB opt-in, H100's 227 KiB, 64 KiB of LDS on MI200/MI300.
TARGETS = {
    "sm80": (("cuda", 80, 32), 166912),
    "sm90": (("cuda", 90, 32), 232448),
    "gfx942": (("hip", "gfx942", 64), 65536),
    "gfx90a": (("hip", "gfx90a", 64), 65536),
}
# Modules whose every kernel must be listed (other modules are covered when they list some).
REQUIRED = ("sparse_decode", "kpool", "gate_scores", "select_blocks")


def _modules() -> dict:
    """Kernel modules that define ``aot_configs()``, by short name."""
    pkg = importlib.import_module("seerattn_r.kernels.triton")
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(module, "aot_configs"):
            found[info.name] = module
    return found


def _configs() -> dict:
    return {c.name: c for module in _modules().values() for c in module.aot_configs()}


def _build(job: tuple[str, str]) -> tuple[str, dict]:
    """Compile one config for one target (runs in the worker, interpreter off)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, target = job
    config = _configs()[name]
    (backend, arch, warp), _ = TARGETS[target]
    try:
        kernel = triton.compile(
            ASTSource(fn=config.fn, signature=config.signature, constexprs=config.constexprs,
                      attrs=config.attrs),
            target=GPUTarget(backend, arch, warp), options=config.options_for(backend))
    except Exception as exc:  # noqa: BLE001 - the report carries any build failure
        return f"{name}|{target}", {"error": f"{type(exc).__name__}: {exc}"[-4000:]}
    asm = kernel.asm["ptx"] if backend == "cuda" else kernel.asm["amdgcn"]
    return f"{name}|{target}", {
        "shared": kernel.metadata.shared,
        "matrix_cores": ("mma" in asm) if backend == "cuda" else ("mfma" in asm),
    }


def _worker() -> None:
    """Build everything in parallel and print the report as JSON."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    jobs = [(name, target) for name in _configs() for target in TARGETS]
    workers = min(len(jobs), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        print(json.dumps(dict(pool.map(_build, jobs))))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, f"AOT worker failed:\n{done.stderr[-6000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_is_listed():
    modules = _modules()
    missing = [m for m in REQUIRED if m not in modules]
    assert not missing, f"modules without aot_configs(): {missing}"
    listed = {c.fn for c in _configs().values()}
    for name, module in modules.items():
        unlisted = [attr for attr, obj in vars(module).items() if attr.endswith("_kernel") and obj not in listed]
        assert not unlisted, f"{name}: kernels with no AOT build: {unlisted}"


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", sorted(_configs()))
def test_builds(report, name, target):
    result = report[f"{name}|{target}"]
    assert "error" not in result, f"{name} does not build for {target}:\n{result['error']}"
    limit = TARGETS[target][1]
    assert result["shared"] <= limit, f"{name} needs {result['shared']} B of shared memory on {target} (max {limit})"
    if _configs()[name].matrix_cores:
        assert result["matrix_cores"], f"{name} does not use the matrix cores on {target}"


if __name__ == "__main__":
    _worker()
