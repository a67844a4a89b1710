"""The benchmark scripts on a two-point CPU subset, so they cannot rot: bench_decode with
the torch reference and the Triton interpreter (plus SDPA and eager FlexAttention),
bench_gate with the torch backend, bench_e2e eager on a two-layer toy Qwen3 (stock,
dense flash decoding, patched sparse), then merge.py and plot.py on their output.

Each script runs in a subprocess (``TRITON_INTERPRET`` must be set before triton is
imported). Shapes are tiny: the point is that every code path runs and the rows say
what a CPU run is (host timer, no CUDA graph), not the timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench_smoke

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = ["--batch", "1", "--tokens", "256", "--heads", "4:2", "--head-dim", "64",
        "--block-size", "16", "--device", "cpu"]


def run_script(name: str, args: list[str], interpret: bool = False) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0", SEERATTN_BACKEND="auto")
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def load(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def decode_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "decode.json"
    run_script("bench_decode.py", [*TINY, "--sparsity", "0.5,0.75", "--backends", "torch,triton",
                                   "--peers", "sdpa,flex", "--graph-calls", "4", "--out", str(out)],
               interpret=True)
    return out


@pytest.fixture(scope="module")
def gate_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "gate.json"
    run_script("bench_gate.py", [*TINY, "--gate-dim", "64", "--sparsity", "0.5,0.9",
                                 "--backends", "torch", "--out", str(out)])
    return out


def test_decode_rows(decode_json):
    data = load(decode_json)
    assert data["bench"] == "decode" and data["info"]["copy_GBps"] > 0
    rows = data["rows"]
    assert sorted(r["sparsity"] for r in rows) == [0.5, 0.75]
    for r in rows:
        assert "host" in r["timer"] and "no CUDA graph" in r["timer"]
        assert not any(k.endswith(("_graph_ms", "_ingraph_ms")) for k in r), "no graph timings on CPU"
        errors = {k: v for k, v in r.items() if k.endswith("_err")}
        assert not errors, errors
        for name in ("seerattn_torch", "seerattn_triton", "sdpa_flash", "flex_dense", "flex_sparse"):
            assert r[f"{name}_ms"] > 0, name
        assert r["seerattn_torch_ok"] and r["seerattn_triton_ok"], r
        assert r["flex_sparse_ok"], r["flex_sparse_relerr"]
        assert r["blocks_read"] == round((1 - r["sparsity"]) * r["blocks"])
        assert 0 < r["floor_sparse_ms"] < r["floor_dense_ms"]
        assert r["best_dense"] in ("sdpa_flash", "flex_dense")


def test_decode_resume_skips_done_points(decode_json):
    """Rerunning with the same --out measures nothing new and keeps the rows."""
    before = load(decode_json)["rows"]
    run_script("bench_decode.py", [*TINY, "--sparsity", "0.5", "--backends", "torch",
                                   "--peers", "none", "--out", str(decode_json)])
    assert load(decode_json)["rows"] == before


def test_gate_rows(gate_json):
    data = load(gate_json)
    rows = data["rows"]
    assert sorted(r["sparsity"] for r in rows) == [0.5, 0.9]
    for r in rows:
        assert not any(k.endswith("_err") for k in r), r
        assert r["torch_select_equal"] and r["torch_scores_relerr"] == 0.0
        for part in ("qproj", "scores", "topk", "select", "update", "attn", "step"):
            assert r[f"torch_{part}_ms"] > 0
        assert 0 < r["torch_gate_share_amortised"] <= r["torch_gate_share"] < 1
        assert r["torch_gate_share_step"] < 1


@pytest.fixture(scope="module")
def e2e_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "e2e.json"
    run_script("bench_e2e.py", ["--layers", "2", "--hidden", "256", "--intermediate", "512",
                                "--heads", "4:2", "--head-dim", "64", "--vocab", "1000",
                                "--context", "512", "--batch", "2", "--budgets", "128",
                                "--modes", "eager", "--steps", "2", "--warmup", "1",
                                "--device", "cpu", "--out", str(out)])
    return out


def test_e2e_rows(e2e_json):
    rows = load(e2e_json)["rows"]
    assert sorted(r["label"] for r in rows) == ["dense-flashdecode", "seerattn-128", "transformers-sdpa"]
    for r in rows:
        assert "err" not in r and "skipped" not in r, r
        assert r["tok_s"] > 0 and r["floor_ms"] > 0
    sparse = next(r for r in rows if r["label"] == "seerattn-128")
    dense = next(r for r in rows if r["label"] == "dense-flashdecode")
    assert sparse["floor_ms"] < dense["floor_ms"]


def test_merge_and_plot(decode_json, gate_json, e2e_json, tmp_path):
    merged = tmp_path / "merged.json"
    run_script("merge.py", [str(merged), str(decode_json), str(decode_json)])
    assert len(load(merged)["rows"]) == len(load(decode_json)["rows"])
    run_script("plot.py", [str(merged), str(gate_json), str(e2e_json), "--out-dir", str(tmp_path)])
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["decode-roofline-cpu.png", "decode-speedup-cpu.png", "e2e-cpu.png", "gate-share-cpu.png"]


def test_merge_fill_adds_peer_columns(decode_json, tmp_path):
    """--fill joins a run of other peers on the same points: columns are added, not
    replaced, and the best dense baseline and speedups are recomputed over all of them."""
    base = tmp_path / "base.json"
    run_script("bench_decode.py", [*TINY, "--sparsity", "0.5,0.75", "--backends", "torch", "--peers", "none",
                                   "--out", str(base)])
    before = {r["sparsity"]: r for r in load(base)["rows"]}
    assert not any("best_dense" in r for r in before.values())
    run_script("merge.py", ["--fill", str(base), str(decode_json)])
    for r in load(base)["rows"]:
        assert r["seerattn_torch_ms"] == before[r["sparsity"]]["seerattn_torch_ms"], "an existing column changed"
        assert r["sdpa_flash_ms"] > 0 and r["flex_sparse_ms"] > 0 and r["seerattn_triton_ms"] > 0
        assert r["best_dense"] in ("sdpa_flash", "flex_dense")
        assert r["seerattn_torch_speedup"] == r["best_dense_ms"] / _best_ms(r, "seerattn_torch")


def _best_ms(row: dict, name: str) -> float:
    times = [row.get(f"{name}_ms"), row.get(f"{name}_graph_ms")]
    return min(t for t in times if t is not None)


def test_gather_floor_kernel_reads_the_selected_blocks():
    """gather_floor.py times a GPU-only gather; its kernel runs here under the interpreter
    against the PyTorch gather of the same blocks (ragged block ids, two rows, three heads)."""
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import gather_floor as G, _common as C\n"
        "k, v = torch.randn(2, 256, 3, 32), torch.randn(2, 256, 3, 32)\n"
        "idx = C.random_block_indices(2, 3, 16, 5, torch.Generator().manual_seed(0), torch.device('cpu'))\n"
        "got, want = G.gather_sum(k, v, idx, 16), G.reference_sums(k, v, idx, 16)\n"
        "assert not torch.allclose(got, torch.zeros_like(got))\n"
        "torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code, str(BENCH)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_in_graph_timer_arguments():
    """time_in_graph has no CPU form (None, as time_graph), and its call count is checked
    where it is set."""
    import torch

    sys.path.insert(0, str(BENCH))
    import _common as C

    assert C.time_in_graph(lambda: None, torch.device("cpu"), 4) is None
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="calls"):
            C.set_graph_calls(bad)
    C.set_graph_calls(0)
    assert C.GRAPH_CALLS == 0
    proc = subprocess.run([sys.executable, str(BENCH / "bench_decode.py"), *TINY, "--graph-calls", "-2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--graph-calls must be >= 0" in proc.stderr
