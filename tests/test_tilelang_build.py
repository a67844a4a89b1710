"""The TileLang Hopper kernels build for sm_90a on a machine without a GPU.

Lowering (TileLang passes + CUDA codegen, no nvcc) proves a configuration is accepted and
shows which instructions it uses; the benchmark configuration is also compiled by nvcc to
a cubin, with and without the cluster combine (whose inline PTX only ptxas checks).
Lowering this kernel takes 5-30 s per configuration, so the default run lowers a covering
set (every dtype, head dim, value head dim, block size, padded GQA group and combine
cluster size appears at least once, with each tile shape of :func:`_tiling` and both GEMM
forms: swap-AB for 64-token tiles, the group as M for smaller blocks);
``SEERATTN_TILELANG_BUILD_ALL=1`` lowers the full product (dtype x D x Dv x block size x
padded group x cluster size, where the cluster combine applies: 720 configurations) for a
release check.
Numerical tests of this backend run on a GPU in ``tests/test_ops.py``
(``SEERATTN_BACKEND=tilelang``).
"""

import itertools
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from seerattn_r.kernels.tilelang import tilelang_unavailable_reason

ARCH = "sm_90a"
DTYPES = ("float16", "bfloat16")
DIMS = (64, 128, 256)
BLOCK_SIZES = (16, 32, 64, 128)

HEADS = (8, 16, 32, 64)
CLUSTERS = (1, 4, 8)

COVERING = [  # dtype, D, Dv, block size, padded GQA group (the wgmma's N), combine cluster
    ("float16", 128, 128, 64, 8, 1),  # the benchmark configuration at batch 16 ...
    ("float16", 128, 128, 64, 8, 8),  # ... and at batch 1 (8 splits combined in a cluster)
    ("bfloat16", 128, 128, 128, 16, 4),  # two tiles per block
    ("float16", 64, 64, 16, 8, 4),  # blocks under 64 tokens: Q K^T with the group as M
    ("bfloat16", 256, 256, 32, 64, 1),
    ("float16", 128, 64, 32, 32, 4),
    ("bfloat16", 64, 256, 16, 16, 8),  # the largest exchange (16 x 256 fp32) with small tiles
    ("float16", 256, 128, 64, 64, 1),
]
if os.environ.get("SEERATTN_TILELANG_BUILD_ALL") == "1":
    CONFIGS = [
        cfg for cfg in itertools.product(DTYPES, DIMS, DIMS, BLOCK_SIZES, HEADS, CLUSTERS)
        if cfg[5] == 1 or cfg[4] * cfg[2] <= 4096
    ]
else:
    CONFIGS = COVERING


def _id(cfg) -> str:
    dtype, dim, dim_v, block_size, heads, cluster = cfg
    return f"{'fp16' if dtype == 'float16' else 'bf16'}-D{dim}-Dv{dim_v}-bs{block_size}-n{heads}-c{cluster}"


def test_import_does_not_load_tilelang():
    code = "import sys, seerattn_r, seerattn_r.ops, seerattn_r.kernels.tilelang; print('tilelang' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unavailable_reason_names_the_device():
    reason = tilelang_unavailable_reason(torch.device("cpu"))
    assert reason is not None and "not a CUDA device" in reason


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_lowers_to_wgmma_and_tma(cfg):
    pytest.importorskip("tilelang")
    from seerattn_r.kernels.tilelang.sparse_decode import lower_source

    src = lower_source(*cfg, ARCH)
    assert "wgmma" in src, "q.K / p.V should be Hopper warpgroup MMAs"
    # Swap-AB: every wgmma is m64 with the padded group as N, except Q K^T for blocks under
    # 64 tokens, which keeps the group as M and the block's tokens as N.
    _, _, _, block_size, heads, cluster = cfg
    shapes = set(re.findall(r"wgmma_ss<[^>]*?, (\d+), (\d+), 16, (?:true|false)", src))
    qk = (64, heads) if block_size >= 64 else (64, block_size)
    assert shapes == {tuple(map(str, qk)), ("64", str(heads))}, shapes
    assert "tma_load" in src, "the selected K/V tiles should be TMA loads"
    # The shared-memory duplicate table needs CUDA's generic atomicMin: a global-only
    # `red` faults on shared memory.
    assert "atomicMin(" in src and "red.relaxed.gpu.global" not in src
    # Once the warpgroups split, a full-CTA barrier would wait on producer warps that have
    # left: only the consumer's named barriers may follow.
    split = src.index("warpgroup_reg_dealloc")
    assert "__syncthreads()" not in src[split:]
    assert "__sync_thread_partial(" in src[split:]
    # Producer warps 1-3 leave before the loop (they issue no TMA; left in, they can fall
    # two barrier phases behind and hang), and only the producer branch loses them.
    producer = src[src.rindex("if (((int)threadIdx.x) < 128) {", 0, split):split]
    assert producer.count("\n") == 1, "the exit must follow the producer branch's register hand-back"
    after = src[split:].splitlines()[1].strip()
    assert after.startswith("if (((int)threadIdx.x) >= 32) return;")
    assert src.count(">= 32) return;") == 1
    # The cluster combine: every thread arrives once before the warpgroups split (the
    # peers' shared memory exists before the exchange), the consumer alone sends its
    # partial through distributed shared memory and waits for its slices to land.
    kernel = src.index("__global__")
    if cluster > 1:
        assert src[kernel:split].count("seer_exchange_init(") == 1
        for call in ("seer_cluster_wait();", "seer_send_f32(", "seer_exchange_wait("):
            assert call in src[split:], call
        assert "st.async.shared::cluster.mbarrier::complete_tx::bytes.f32" in src and "mapa.shared::cluster" in src
        assert "AtomicAddRet" not in src[kernel:], "a clustered launch needs no split counter"
        offset = re.search(r"xbar = \(\(void\*\)\(\(char\*\)buf_dyn_shmem \+ (\d+)\)\)", src)
        assert offset and int(offset.group(1)) % 8 == 0, "the exchange's mbarrier must be 8-byte aligned"
    else:
        assert not re.search(r"seer_(cluster|send|exchange)", src[kernel:])
    # The prologue's L2 prefetches name the kernel's own tensor maps, in the coordinate
    # order of its TMA loads: (column, token, KV head, row).
    assert "cp.async.bulk.prefetch.tensor.4d.L2.global.tile" in src
    for cache in ("K", "V"):
        assert f"seer_prefetch_{cache.lower()}(" in src[kernel:split]
        load = re.search(rf"tl::tma_load\({cache}_desc, [^;]*\);", src[split:])
        assert load and load.group(0).endswith("((int)blockIdx.y), ((int)blockIdx.z));"), load


def test_producer_patch_refuses_unknown_codegen():
    pytest.importorskip("tilelang")
    from seerattn_r.kernels.tilelang.sparse_decode import _one_producer_warp

    with pytest.raises(RuntimeError, match="tilelang version"):
        _one_producer_warp("extern \"C\" __global__ void sparse_decode_kernel_kernel() {}")


@pytest.mark.parametrize("cluster", [1, 8])
def test_nvcc_builds_main_config(monkeypatch, cluster):
    pytest.importorskip("tilelang")
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if shutil.which("nvcc") is None and not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        pytest.skip("nvcc not found")
    monkeypatch.setenv("CUDA_HOME", cuda_home)
    from seerattn_r.kernels.tilelang.sparse_decode import _build

    kernel = _build("float16", 128, 128, 64, 8, cluster, ARCH)
    src = kernel.get_kernel_source()
    assert "wgmma" in src and "tma_load" in src


@pytest.mark.parametrize(
    "units, slots, max_tiles, expected",
    [
        (8, 51, 51, 16),  # batch 1 x 8 KV heads: as many splits as fit one wave of 132 SMs
        (8, 13, 13, 13),  # ... but no more than one tile each
        (8, 4096, 4096, 16),  # long index rows: 4 splits' worth of _LIST slots fit in 16
        (32, 51, 51, 4),  # batch 4
        (128, 51, 51, 1),  # batch 16: one split, 128 CTAs
        (8, 40000, 80000, 45),  # at least 40 splits (_LIST slots each); past one wave the
        # fewest that fill the waves within 90% of the best count (360 of 396 slots)
        (256, 51, 51, 1),  # more units than SMs: the waves rule (256 of 264 slots used)
    ],
)
def test_split_count(units, slots, max_tiles, expected):
    """The split count depends on shapes only (no device sync), fills one wave of SMs when
    the units fit in one, never gives a split more than _LIST index slots and never
    exceeds one tile per split (132 SMs, as on an H100)."""
    from seerattn_r.kernels.tilelang import sparse_decode as sd

    n = sd._num_splits(units, slots, max_tiles, 132)
    assert n == expected
    assert 1 <= n <= max(sd._MAX_SPLITS, -(-slots // sd._LIST))
    assert -(-slots // n) <= sd._LIST


@pytest.mark.parametrize(
    "units, slots, max_tiles, heads, dim_v, expected",
    [
        (8, 51, 51, 8, 128, 8),  # batch 1 x 8 KV heads: 8 splits in clusters of 8 (64 CTAs)
        (16, 51, 51, 8, 128, 4),  # batch 2: clusters of 4
        (32, 51, 51, 8, 128, 1),  # batch 4: 4 splits through memory (clusters of 2 lost)
        (6, 51, 51, 8, 128, 8),  # 48 CTAs
        (24, 51, 51, 8, 128, 1),  # batch 3: 24 clusters of 4 would take 96 of the 132 SMs
        (4, 51, 51, 8, 128, 1),  # 32 CTAs would leave HBM idle: 33 splits through memory
        (8, 3, 3, 8, 128, 1),  # no split may be empty
        (8, 9000, 9000, 8, 128, 1),  # 9 splits' worth of index slots
        (16, 5000, 5000, 8, 128, 1),  # 5 splits' worth: more than a cluster of 4 holds
        (8, 51, 51, 64, 128, 1),  # a 64 x 128 fp32 exchange does not fit next to the pipeline
        (8, 51, 51, 16, 256, 8),  # 16 x 256 does
    ],
)
def test_cluster_size(units, slots, max_tiles, heads, dim_v, expected):
    """The small-batch combine's cluster size (= split count) on 132 SMs, as on an H100:
    clusters within half the SMs (all resident at once) and over a third of them."""
    from seerattn_r.kernels.tilelang import sparse_decode as sd

    size = sd._cluster_size(units, slots, max_tiles, 132, heads, dim_v)
    assert size == expected
    if size > 1:
        assert 132 // 3 <= units * size <= 132 // 2 and -(-slots // size) <= sd._LIST


def test_plan():
    """What a launch gets, from shapes alone (132 SMs, group 8, Dv 128, block 64): batch 1
    x 8 KV heads, 51 of 512 blocks, 8 splits in clusters of 8; batch 16, one split and no
    cluster; 3 slots at batch 1, no cluster (a split per tile, combined through memory)."""
    from seerattn_r.kernels.tilelang import sparse_decode as sd

    assert sd._plan(8, 51, 32768, 64, 132, 8, 128) == (8, 8)
    assert sd._plan(128, 51, 32768, 64, 132, 8, 128) == (1, 1)
    assert sd._plan(8, 3, 32768, 64, 132, 8, 128) == (3, 1)


def test_padded_group():
    """The GQA group is padded to the wgmma N that a compile is keyed on: 8, 16, 32 or 64."""
    from seerattn_r.kernels.tilelang import sparse_decode as sd

    assert [sd._heads(g) for g in (1, 7, 8, 9, 16, 17, 33, 64)] == [8, 8, 8, 16, 16, 32, 64, 64]
