"""Block-sparse flash decoding for Hopper (sm_90) in TileLang.

One launch does everything. A CTA serves one (row ``b``, KV head ``h``, split ``s``):

1. It owns the index slots ``s, s + S, s + 2S, ...`` of ``block_indices[b, h, :]`` (``S``
   splits). The selection op packs its ids in front of the ``-1`` padding, so dealing
   slots round-robin spreads the selected blocks evenly over the splits. A slot counts
   when its id is in range (``0 <= id < ceil(len_b / block_size)``) and no earlier slot of
   the row holds the same id: a shared-memory table keeps, per block id, the lowest slot
   that names it (``atomicMin``), so every CTA of the row agrees on who reads a duplicated
   block, in time linear in ``M`` and the row's block count. Warp 0 then lists the CTA's
   full blocks with ballots. Before any of that, as soon as the index slots arrive, the
   CTA's first blocks (128 tokens) are prefetched into L2 with TMA tensor prefetches, so
   that HBM serves them while the table and the list are built: the prologue is about 2 us
   at batch 1, as long as the first tiles' loads would otherwise wait on HBM after it.
2. Those blocks run through a software-pipelined loop (``T.Pipelined``: TMA loads issued by
   a producer warpgroup) of two wgmma GEMMs with A and B swapped: ``S^T = K Q^T`` and
   ``O^T = V^T P^T``, so the tile's 64 tokens (and Dv) are the wgmma's M and the GQA group
   its N, padded only to 8, 16, 32 or 64. Padding the group to M = 64 instead cost a group
   of 8 eight times the tensor work per tile, on the critical path of every CTA. The
   online softmax (fp32, ``exp2``, log2(e) folded into the scale) reads S from shared
   memory in a (heads x tokens) layout of its own and writes P there for the second GEMM.
   Each thread keeps its share of the denominators until the loop ends, so a tile's chain
   of dependent steps holds one cross-thread reduction (the max), not two: at batch 1 a
   CTA runs six or seven tiles back to back with their loads issued well ahead (the L2
   prefetch, four stages), and that chain, not HBM, sets the loop's pace (about 0.7 us a
   tile on an H100, from per-CTA clock stamps).
   Blocks of 16 or 32 tokens cannot fill M, so for them ``Q K^T`` keeps the group padded to
   M (a compile-time branch). The row's last block, when partial and selected, is
   the loop's last tiles and is read as the tiles that *end* at the row's last token, with
   the tokens before the block masked out of the softmax. So no tile reads past a row's
   tokens, and the loop has one body, no per-token guards and no second copy for the
   partial block: the kernel's code stays small, which matters at decode, where every
   instruction runs a handful of times and a cold instruction cache dominates. (A row
   shorter than one tile reads TMA zero fill, or with ``cache_offsets`` the row's left
   padding, in front of its tokens; those columns are masked like the rest, so they must
   hold finite values, as any cache a model wrote does.)
3. With one split the CTA writes ``out`` and ``lse`` directly. Otherwise the splits'
   normalised outputs and log2-sum-exps are combined, in one of two ways:

   * At small batch, where the ``(b, h)`` units leave most SMs free, the splits of a unit
     are one thread-block cluster of 4 or 8 CTAs and combine through distributed
     shared memory: each CTA sends column slice ``k`` of its partial, from registers, to
     CTA ``k`` of the cluster (``st.async``, counted by an mbarrier of the receiver), and
     each CTA folds the slices it received as soon as they have all landed and writes its
     columns of ``out``. No global round trip, where the counter below costs three
     dependent ones (the partials' write acknowledged, the atomic, the partials' reload):
     at batch 1 on an H100 the split-combine took 2.0-2.2 us of the call, and 8 splits in
     clusters of 8 beat 16 splits combined through memory at every batch-1 point (e.g.
     11.2 vs 11.8 us at 32k x 90% as one node of a CUDA graph, 11.6 vs 12.5 at 8k x 50%).
     Waiting on the receiver's own mbarrier instead of a cluster-wide release/acquire
     barrier saved another 0.4-0.6 us at batch 1 (10.5 -> 10.0 us at 32k x 90%).
   * Otherwise the partials go to a fp32 workspace; the last CTA of ``(b, h)`` to finish
     (an acq-rel counter after a warpgroup barrier, kept per stream and reset by that CTA
     for the next launch) combines the splits in one pass: each thread folds 16 splits'
     partials for 8 columns at a time with an online log-sum-exp, all 16 loads in flight
     at once.

One producer warp. TileLang's warp specialisation (0.1.15) runs the producer loop on all
four warps of the producer warpgroup, although only warp 0 issues the TMA loads: warps 1-3
only wait on the "stage free" barriers. Nothing waits for them, so they can fall two
barrier phases behind warp 0 (a ``try_wait`` may sleep for up to 10 ms); a parity wait
then cannot tell the phase it wants from one two later, and they wait forever for a phase
that never comes. On an H100 this hung about one process in three of the benchmark grid;
cuda-gdb on a hung launch showed exactly that: warps 1-3 of one CTA in the stage-free
wait, warp 0 and the consumer warpgroup gone. :func:`_one_producer_warp` patches the
generated CUDA so that warps 1-3 leave right after the warpgroup's register hand-back
(which all four must execute); the build fails loudly if TileLang's output no longer has
the shape the patch expects.

What triggers a compile (one kernel per key, cached in memory and in TileLang's on-disk
cache, so a second process loads it): the dtype, ``D``, ``Dv``, the block size, the GQA
group padded to 8, 16, 32 or 64, the cluster size of the small-batch combine (1, 4 or 8;
it follows the number of ``(b, h)`` units, see :func:`_cluster_size`) and the GPU
architecture. Cache length (and the caches' strides), the head counts within that
padding, the number of indices ``M``, the offsets and the split count are run-time
values: a decode loop at a fixed batch size compiles once, and all batch sizes together
at most three times (with 8 KV heads: batch 1, batch 2, the rest).
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func's annotations,
# which name the factory's local symbolic dims.
import contextlib
import functools
import math
import re
import threading

import torch

# Swap-AB: the tile's tokens are the wgmma's M (64 rows per warpgroup) and the GQA group its
# N, padded to a power of two from 8 (the smallest wgmma N) to 64: a group of 8 costs 8 times
# less tensor work per tile than the group padded to M = 64.
_TILE = 64
_HEADS = (8, 16, 32, 64)
_THREADS = 128
# The duplicate table holds one int32 per block of a row: rows of more blocks take Triton.
MAX_BLOCKS = 8192
# A split lists at most this many selected blocks in shared memory; the host picks the
# split count so that no split owns more slots.
_LIST = 1024
# More splits than this only add partials to combine (and index slots past _LIST * this
# take Triton).
_MAX_SPLITS = 64
# Shared memory for the pipeline stages to fill (the H100/H200 limit is 227 KiB per CTA).
_SMEM_BUDGET = 200 * 1024
# Columns of one output row a thread combines (16 splits' worth in flight at once).
_COLS = 8
# Cluster sizes of the small-batch combine, largest first. A cluster's CTAs must be
# resident together, one per SM: the clusters of a launch stay within half the SMs, which
# an H100 holds at either size (15 clusters of 8 and 30 of 4 fit this kernel's shared
# memory) while 16 clusters of 8 already take two waves. Clusters of 2 lost to 4-5
# splits combined through memory at batch 3-4 with 8 KV heads (by up to 2.5%, H100).
_CLUSTERS = (8, 4)
# Each cluster CTA receives as much as its partial (heads x Dv fp32): bounded so that the
# exchange costs the pipeline no more than 16 KiB of shared memory.
_CLUSTER_ELEMS = 4096
# Tokens of its first blocks that each split prefetches into L2 in its prologue. Two 64-token
# blocks took batch 1 x 32k x 90% from 11.3 to 10.5 us as one node of a CUDA graph (H100,
# fp16) and every batch-1 point by 0.4-1.3 us; one block saved less, and eight (a whole
# split at batch 1) lost 0.8 us: the later blocks' prefetches delay the first ones.
_PREFETCH_TOKENS = 128
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_INT_MAX = 2**31 - 1

_TILELANG_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}

# Distributed shared memory, the cluster barrier and L2 prefetches of TMA boxes, which
# TileLang's language does not expose as scalar operations: inline PTX, prepended to the
# kernel's source. (Clustered kernels alone use the first two.)
_PRELUDE = r"""
// The cluster combine's arrival barrier (an mbarrier in this CTA's shared memory): thread 0
// sets it to expect `bytes` from the peers' st.async stores; then every thread arrives
// (relaxed) on the cluster barrier whose wait, before the first store, guarantees that every
// peer has started and initialised its barrier.
__device__ __forceinline__ void seer_exchange_init(void* bar, unsigned bytes) {
  if (threadIdx.x == 0) {
    unsigned b = static_cast<unsigned>(__cvta_generic_to_shared(bar));
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(b) : "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(b), "r"(bytes) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncwarp();
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void seer_cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }
// The address of `local` (this CTA's shared memory) in the shared memory of cluster CTA `rank`.
__device__ __forceinline__ unsigned seer_mapa(const void* local, unsigned rank) {
  unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(local)), remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
  return remote;
}
// Store `v` at `dst` in cluster CTA `rank` and count its 4 bytes on that CTA's barrier `bar`.
__device__ __forceinline__ void seer_send_f32(void* dst, unsigned rank, float v, void* bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];"
               :: "r"(seer_mapa(dst, rank)), "f"(v), "r"(seer_mapa(bar, rank)) : "memory");
}
// Wait until every byte this CTA's barrier expects has arrived (its first phase).
__device__ __forceinline__ void seer_exchange_wait(void* bar) {
  unsigned b = static_cast<unsigned>(__cvta_generic_to_shared(bar)), done = 0;
  while (!done) {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(b) : "memory");
  }
}
// Start bringing one TMA box of `map` at the given coordinates (innermost first) into L2;
// nothing waits on it, and a box outside the tensor is dropped. The macros name the kernel's
// own K/V tensor maps (parameters of the generated kernel), which TileLang's language does
// not expose.
__device__ __forceinline__ void seer_prefetch_box(const void* map, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.prefetch.tensor.4d.L2.global.tile [%0, {%1, %2, %3, %4}];"
               :: "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3) : "memory");
}
#define seer_prefetch_k(c0, c1, c2, c3) seer_prefetch_box(&K_desc, c0, c1, c2, c3)
#define seer_prefetch_v(c0, c1, c2, c3) seer_prefetch_box(&V_desc, c0, c1, c2, c3)
"""


def _heads(group: int) -> int:
    """The wgmma N that the GQA group is padded to."""
    return next(n for n in _HEADS if n >= group)


def _tile(block_size: int) -> int:
    """Tokens per tile: one block, or a 64-token part of a larger one."""
    return min(block_size, _TILE)


def _tiling(dim: int, dim_v: int, block_size: int, heads: int, cluster: int) -> tuple[int, int]:
    """(tokens per tile, pipeline stages); see :func:`_tile`. A CTA owns its SM (warp
    specialisation sets the register split for one CTA of 256 threads), so the stages
    take what shared memory Q (the group padded to M for tiles under 64 tokens), the
    scores, the duplicate table, the block list and (in a cluster) the combine's exchange
    buffers leave: the more K/V bytes in flight, the closer to the bandwidth floor."""
    tile = _tile(block_size)
    q_rows = heads if tile == _TILE else _TILE
    stage_bytes = tile * (dim + dim_v) * 2
    exchange = 4 * heads * (dim_v + cluster + 1) if cluster > 1 else 0
    free = _SMEM_BUDGET - q_rows * dim * 2 - heads * tile * 6 - MAX_BLOCKS * 4 - _LIST * 4 - exchange
    # About 128 KiB of K/V in flight keeps an SM's share of HBM busy; more stages only add
    # barriers.
    return tile, max(2, min(8, free // stage_bytes, 131072 // stage_bytes))


@functools.cache
def _build(dtype: str, dim: int, dim_v: int, block_size: int, heads: int, cluster: int, arch: str):
    """Compile the kernel for one configuration (see the module docstring for the key);
    ``cluster`` is 1 or the cluster size of the distributed-shared-memory combine."""
    import tilelang

    with _one_producer_warp_codegen():
        return tilelang.compile(
            _program(dtype, dim, dim_v, block_size, heads, cluster),
            target={"kind": "cuda", "arch": arch},
            pass_configs=_pass_configs(),
            # Not needed by the source; it keys TileLang's on-disk cache apart from any
            # binary of the same program built without the patch.
            compile_flags=["-DSEERATTN_ONE_PRODUCER_WARP=1"],
        )


_KERNEL_NAME = "sparse_decode_kernel_kernel"
_PRODUCER_BRANCH = re.compile(
    r"if \(\(\(int\)threadIdx\.x\) < 128\) \{\n(\s*)tl::warpgroup_reg_dealloc<\d+>\(\);\n"
)
_CODEGEN_HOOK = "tilelang_callback_cuda_postproc"
_hook_lock = threading.Lock()


def _one_producer_warp(code: str) -> str:
    """The kernel's CUDA source with producer warps 1-3 leaving the producer branch right
    after its register hand-back (see the module docstring for the hang this prevents)."""
    found = list(_PRODUCER_BRANCH.finditer(code))
    if len(found) != 1 or "tl::tl_shuffle_elect<128>()" not in code:
        raise RuntimeError(
            "seerattn_r: TileLang's generated sparse_decode source no longer has the one "
            "producer branch (threads 0-127, TMA issued by warp 0) that this module patches; "
            "install the tilelang version in seerattn-r's [tilelang] extra"
        )
    end, indent = found[0].end(), found[0].group(1)
    return code[:end] + f"{indent}if (((int)threadIdx.x) >= 32) return;  // warps 1-3 issue nothing\n" + code[end:]


@contextlib.contextmanager
def _one_producer_warp_codegen():
    """Apply :func:`_one_producer_warp` to this kernel's CUDA source while inside, through
    TileLang's codegen hook; a hook already registered still runs, and is restored after."""
    import tvm_ffi

    with _hook_lock:
        previous = tvm_ffi.get_global_func(_CODEGEN_HOOK, allow_missing=True)

        def hook(code, target):
            if previous is not None:
                code = previous(code, target)
            return _one_producer_warp(code) if _KERNEL_NAME in code else code

        tvm_ffi.register_global_func(_CODEGEN_HOOK, f=hook, override=True)
        try:
            yield
        finally:
            if previous is not None:
                tvm_ffi.register_global_func(_CODEGEN_HOOK, f=previous, override=True)
            else:
                tvm_ffi.remove_global_func(_CODEGEN_HOOK)


def _pass_configs() -> dict:
    import tilelang

    # Warp specialisation stays on (it is what lowers T.Pipelined to TMA + mbarriers):
    # it adds a producer warpgroup, so the kernel runs 256 threads and the code outside
    # the pipelined loop is written to be right on either warpgroup. TileLang's automatic
    # barrier insertion is off: on this kernel it placed barriers inside branches that only
    # some threads take (or refused to build); every barrier the kernel needs is written
    # out, a full one before the warpgroups split and a consumer-only one after. Shared
    # memory is not reused across buffers: one CTA per SM is all that 256 threads at 240
    # registers allow anyway, so overlapping buffers would save nothing and would make
    # every barrier above depend on which buffers the planner chose to overlap.
    return {
        tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True,
        tilelang.PassConfigKey.TL_DISABLE_THREAD_STORAGE_SYNC: True,
        tilelang.PassConfigKey.TL_DISABLE_SHARED_MEMORY_REUSE: True,
    }


def lower_source(dtype: str, dim: int, dim_v: int, block_size: int, heads: int, cluster: int, arch: str) -> str:
    """CUDA source of one configuration, lowered without nvcc (for the build test)."""
    import tilelang
    import tvm

    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    with _one_producer_warp_codegen(), tvm.transform.PassContext(config=_pass_configs()), target:
        func = _program(dtype, dim, dim_v, block_size, heads, cluster)
        return tilelang.lower(func, target=target, enable_device_compile=False).kernel_source


def _program(dtype: str, dim: int, dim_v: int, block_size: int, heads: int, cluster: int):
    """The TileLang ``prim_func`` for one configuration (also lowered by the build test)."""
    import tilelang.language as T

    acc = "float32"
    tile, stages = _tiling(dim, dim_v, block_size, heads, cluster)
    sub = block_size // tile  # tiles per block
    # Swap-AB needs the tile's tokens to fill the wgmma's M; a tile of 16 or 32 tokens
    # (a block that small) computes Q K^T with the group padded to M instead.
    swap = tile == _TILE
    q_rows = heads if swap else _TILE
    # The cluster combine's buffers; a single element each without clusters.
    slice_v = dim_v // cluster  # output columns each cluster CTA combines
    recv_shape = (cluster, heads, slice_v) if cluster > 1 else (1, 1, 1)
    recv_lse_shape = (cluster, heads) if cluster > 1 else (1, 1)
    batch, smax, hkv, hq, m, nsplit, nsem = T.dynamic("batch, smax, hkv, hq, m, nsplit, nsem")
    skb, sks, skh, svb, svs, svh = T.dynamic("skb, sks, skh, svb, svs, svh")
    neg_inf = -T.infinity(acc)
    prefetch = max(1, _PREFETCH_TOKENS // block_size)  # blocks per split

    def consumer_sync():
        # After the pipelined loop only the consumer warpgroup runs (the producer has
        # exited): a named barrier over its 128 threads, never one that waits for all 256.
        T.evaluate(T.call_extern("handle", "tl::__sync_thread_partial", 1, _THREADS))

    def ballot(pred):
        return T.call_extern("uint32", "__ballot_sync", T.uint32(0xFFFFFFFF), pred)

    @T.prim_func
    def sparse_decode_kernel(
        Q: T.Tensor((batch, hq, dim), dtype),
        K: T.StridedTensor((batch, smax, hkv, dim), (skb, sks, skh, 1), dtype),
        V: T.StridedTensor((batch, smax, hkv, dim_v), (svb, svs, svh, 1), dtype),
        seqlens: T.Tensor((batch,), "int32"),
        offsets: T.Tensor((batch,), "int32"),
        indices: T.Tensor((batch, hkv, m), "int32"),
        scale: T.float32,
        group: T.int32,
        Out: T.Tensor((batch, hq, dim_v), dtype),
        Lse: T.Tensor((batch, hq), acc),
        Opart: T.Tensor((batch, hq, nsplit, dim_v), acc),
        Lpart: T.Tensor((batch, hq, nsplit), acc),
        sem: T.Tensor((nsem,), "int32"),
    ):
        # With clusters, nsplit == cluster: one cluster per (b, h), the split id its rank.
        with T.Kernel(
            nsplit, hkv, batch, threads=_THREADS,
            prelude=_PRELUDE,
            cluster_dims=(cluster, 1, 1) if cluster > 1 else None,
        ) as (sid, hk, b):
            tx = T.get_thread_binding()
            first_slot = T.alloc_shared((MAX_BLOCKS,), "int32")
            chosen = T.alloc_shared((_LIST,), "int32")
            # The prologue's index slots, for warp 0's listing. Sized for both warpgroups:
            # thread t >= 128 of the setup (see below) stores slot t, which is never read.
            first_ids_s = T.alloc_shared((2 * _THREADS,), "int32")
            info = T.alloc_shared((2,), "int32")  # this split's full blocks, owns the partial one
            flag = T.alloc_shared((1,), "int32")  # last split of (b, h): not info, which sizes the loop
            acc_c = T.alloc_local((_COLS,), acc)
            parts = T.alloc_local((16 * _COLS,), acc)  # combine: 16 splits x _COLS columns
            lses = T.alloc_local((16,), acc)  # combine: 16 splits' log2-sum-exp
            lse_stage = T.alloc_shared((heads if cluster > 1 else 1,), acc)  # cluster combine: this CTA's LSE
            recv = T.alloc_shared(recv_shape, acc)  # ... and the partials' slices the others sent here
            recv_lse = T.alloc_shared(recv_lse_shape, acc)
            xbar = T.alloc_shared((1,), "uint64")  # ... counting their bytes as they land
            q_s = T.alloc_shared((q_rows, dim), dtype)
            k_s = T.alloc_shared((tile, dim), dtype)
            v_s = T.alloc_shared((tile, dim_v), dtype)
            # Swap-AB: S^T = K Q^T (S = Q K^T for tiles under 64 tokens) and O^T = V^T P^T,
            # tokens and Dv as the wgmma's M. The softmax runs on S in its own (heads x
            # tokens) layout, through shared memory.
            s_qk = T.alloc_fragment((tile, heads) if swap else (_TILE, tile), acc)
            s_sh = T.alloc_shared((heads, tile), acc)
            s = T.alloc_fragment((heads, tile), acc)
            p_s = T.alloc_shared((heads, tile), dtype)
            o_t = T.alloc_fragment((dim_v, heads), acc)
            alpha_s = T.alloc_shared((heads,), acc)  # the softmax's rescale, for O^T's threads
            l_s = T.alloc_shared((heads,), acc)
            m_i = T.alloc_fragment((heads,), acc)
            m_prev = T.alloc_fragment((heads,), acc)
            m_use = T.alloc_fragment((heads,), acc)
            alpha = T.alloc_fragment((heads,), acc)
            l_i = T.alloc_fragment((heads,), acc)
            # Each thread's share of the denominators, in the scores' layout, summed across
            # threads after the loop (see the module docstring).
            l_acc = T.alloc_fragment((heads, tile), acc)
            count = T.alloc_var("int32", init=0)
            partial = T.alloc_var("uint32", init=0)

            if cluster > 1:
                # The exchange's arrival barrier expects every peer's slice of this CTA's
                # columns and every peer's log-sum-exps. The cluster barrier, waited on before
                # the exchange, has every CTA of the cluster started (its shared memory and
                # barrier exist) before a peer writes into it. All 256 threads arrive; those
                # that exit early stop counting (PTX `exit` releases the barriers they hold up).
                T.evaluate(
                    T.call_extern("handle", "seer_exchange_init", T.address_of(xbar[0]), cluster * heads * (slice_v + 1) * 4)
                )
            head0 = hk * group
            # Every load that needs only the CTA's place goes out before anything waits on
            # one: the first 128 index slots (where a decode's selection usually fits), the
            # row's length and offset, then the query tile, so that the prologue waits on one
            # memory round trip instead of several in a row. (Explicit variables: a load
            # bound by name is emitted where it is used, which is after the prefetches'
            # inline PTX, and the compiler keeps loads behind inline PTX.)
            first_ids = T.alloc_var("int32")
            first_ids = T.if_then_else(tx < m, indices[b, hk, T.min(tx, m - 1)], -1)
            off = T.alloc_var("int32")
            off = offsets[b]
            row_len = T.alloc_var("int32")
            row_len = seqlens[b]
            for i, d in T.Parallel(q_rows, dim):
                q_s[i, d] = T.if_then_else(i < group, Q[b, head0 + i, d], 0)
            # The first blocks this split owns (slot tx is thread tx's) go to L2 now, so that
            # HBM serves them while the table and the list are built rather than after: the
            # pipeline's first loads then find them there. A box outside the cache (-1, ids
            # past it) is dropped; a duplicate or an id past the row wastes a prefetch.
            if tx < m and tx % nsplit == sid and tx // nsplit < prefetch:
                for j, c in T.grid(block_size // tile, T.ceildiv(dim, 64)):
                    T.evaluate(T.call_extern("handle", "seer_prefetch_k", c * 64, off + first_ids * block_size + j * tile, hk, b))
                for j, c in T.grid(block_size // tile, T.ceildiv(dim_v, 64)):
                    T.evaluate(T.call_extern("handle", "seer_prefetch_v", c * 64, off + first_ids * block_size + j * tile, hk, b))
            # Tokens of this row inside the cache; blocks past them are out of range.
            length = T.max(T.min(row_len, smax - off), 0)
            nvalid = T.ceildiv(length, block_size)
            nfull = length // block_size
            mine = T.ceildiv(T.max(m - sid, 0), nsplit)  # slots this split owns

            # Warp specialisation runs this setup on both warpgroups (256 threads) while the
            # code is written for 128: every step below is either idempotent when a thread
            # past 127 repeats another's work (a store of the same value, atomicMin) or
            # limited to warp 0.
            # 1. Lowest slot naming each in-range block id.
            for i in T.serial(T.ceildiv(nvalid, _THREADS)):
                if i * _THREADS + tx < nvalid:
                    first_slot[i * _THREADS + tx] = _INT_MAX
            first_ids_s[tx] = first_ids
            T.sync_threads()
            for i in T.serial(T.ceildiv(m, _THREADS)):
                if i * _THREADS + tx < m:
                    bid = T.if_then_else(i == 0, first_ids, indices[b, hk, i * _THREADS + tx])
                    if bid >= 0 and bid < nvalid:
                        # CUDA's atomicMin: T.atomic_min emits a global-only `red` that faults on shared memory.
                        T.evaluate(
                            T.call_extern("int32", "atomicMin", T.address_of(first_slot[bid]), i * _THREADS + tx)
                        )
            T.sync_threads()
            # 2. Warp 0 lists this split's full blocks (slots in order) and notes whether it
            # owns the partial last block.
            if tx < 32:
                below = T.shift_left(T.uint32(1), T.Cast("uint32", tx)) - T.uint32(1)
                for c in T.serial(T.ceildiv(mine, 32)):
                    slot = sid + (c * 32 + tx) * nsplit
                    # Slots below 128 were loaded in the prologue: no second trip to memory.
                    cand = T.if_then_else(
                        c * 32 + tx < mine,
                        T.if_then_else(
                            slot < _THREADS, first_ids_s[T.min(slot, _THREADS - 1)], indices[b, hk, T.min(slot, m - 1)]
                        ),
                        -1,
                    )
                    counted = (cand >= 0) and (cand < nvalid) and (first_slot[T.max(T.min(cand, nvalid - 1), 0)] == slot)
                    full = ballot(counted and cand < nfull)
                    if counted and cand < nfull:
                        chosen[count + T.Cast("int32", T.popcount(full & below))] = cand * block_size
                    count += T.Cast("int32", T.popcount(full))
                    partial |= ballot(counted and cand >= nfull)
                if tx == 0:
                    info[0] = count
                    info[1] = T.if_then_else(partial != T.uint32(0), 1, 0)
                    if partial != T.uint32(0):
                        # The partial block is read as the block-sized window that ends at
                        # the row's last token: no tile reads past the row.
                        chosen[count] = length - block_size
            # info and chosen (and q_s) are read by every thread below.
            T.sync_threads()
            T.fill(o_t, 0)
            T.fill(l_acc, 0)
            T.fill(m_i, neg_inf)

            nfull_tiles = info[0] * sub
            ntiles = (info[0] + info[1]) * sub
            for k in T.Pipelined(ntiles, num_stages=stages):
                # Row-relative first token of the tile; in the partial block's window the
                # tokens before the block are masked (and those before the row, when the row
                # is shorter than a block).
                t0 = chosen[k // sub] + (k % sub) * tile
                floor = T.if_then_else(k < nfull_tiles, 0, nfull * block_size)
                T.copy(K[b, off + t0 : off + t0 + tile, hk, :], k_s)
                T.clear(s_qk)
                if swap:
                    T.gemm(k_s, q_s, s_qk, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    for j, i in T.Parallel(tile, heads):
                        s_sh[i, j] = s_qk[j, i]
                else:
                    T.gemm(q_s, k_s, s_qk, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    for i, j in T.Parallel(_TILE, tile):
                        if i < heads:
                            s_sh[i, j] = s_qk[i, j]
                consumer_sync()
                for i, j in T.Parallel(heads, tile):
                    s[i, j] = T.if_then_else(t0 + j >= floor, s_sh[i, j] * scale, neg_inf)
                T.copy(m_i, m_prev)
                T.reduce_max(s, m_i, dim=1, clear=False)
                for i in T.Parallel(heads):
                    # m_i stays -inf through a first tile with every column masked (the
                    # partial window's first tile, block size 128): shift by 0 then, not NaN.
                    m_use[i] = T.if_then_else(m_i[i] == neg_inf, 0, m_i[i])
                    alpha[i] = T.exp2(m_prev[i] - m_use[i])
                for i, j in T.Parallel(heads, tile):
                    s[i, j] = T.exp2(s[i, j] - m_use[i])
                    l_acc[i, j] = l_acc[i, j] * alpha[i] + s[i, j]
                for i in T.Parallel(heads):
                    alpha_s[i] = alpha[i]
                T.copy(s, p_s)
                consumer_sync()
                for d, i in T.Parallel(dim_v, heads):
                    o_t[d, i] *= alpha_s[i]
                T.copy(V[b, off + t0 : off + t0 + tile, hk, :], v_s)
                T.gemm(v_s, p_s, o_t, transpose_A=True, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)

            # 3. This split's normalised output and log2-sum-exp (-inf: it saw no token).
            T.reduce_sum(l_acc, l_i, dim=1)
            for i in T.Parallel(heads):
                l_s[i] = l_i[i]
                m_i[i] = T.if_then_else(ntiles > 0, T.log2(l_i[i]) + m_i[i], neg_inf)
                if cluster > 1:
                    lse_stage[i] = m_i[i]
            consumer_sync()
            for d, i in T.Parallel(dim_v, heads):
                o_t[d, i] = T.if_then_else(ntiles > 0, o_t[d, i] / l_s[i], 0)
            if cluster > 1:
                T.evaluate(T.call_extern("handle", "seer_cluster_wait"))
                # Reduce-scatter, straight from the registers: column d of this partial goes
                # to rank d // slice_v; every rank gets every split's log-sum-exp.
                for d, i in T.Parallel(dim_v, heads):
                    T.evaluate(
                        T.call_extern(
                            "handle", "seer_send_f32", T.address_of(recv[sid, i, d % slice_v]), d // slice_v, o_t[d, i],
                            T.address_of(xbar[0]),
                        )
                    )
                for e in T.serial(T.ceildiv(heads * cluster, _THREADS)):
                    if e * _THREADS + tx < heads * cluster:
                        h = (e * _THREADS + tx) % heads
                        T.evaluate(
                            T.call_extern(
                                "handle", "seer_send_f32", T.address_of(recv_lse[sid, h]),
                                (e * _THREADS + tx) // heads, lse_stage[h], T.address_of(xbar[0]),
                            )
                        )
                # Every peer's stores to this CTA have landed: no cluster-wide barrier, so a
                # CTA waits for its own slices only, not for every peer to have sent all.
                T.evaluate(T.call_extern("handle", "seer_exchange_wait", T.address_of(xbar[0])))
                for i, c in T.Parallel(heads, slice_v):
                    if i < group:
                        top = T.alloc_var(acc)
                        wsum = T.alloc_var(acc)
                        osum = T.alloc_var(acc)
                        top = neg_inf
                        for r in T.serial(cluster):
                            top = T.max(top, recv_lse[r, i])
                        # A head no split saw stays at -inf: shift by 0, not NaN.
                        shift = T.if_then_else(top == neg_inf, 0, top)
                        wsum = 0
                        osum = 0
                        for r in T.serial(cluster):
                            w = T.exp2(recv_lse[r, i] - shift)
                            wsum = wsum + w
                            osum = osum + w * recv[r, i, c]
                        Out[b, head0 + i, sid * slice_v + c] = T.if_then_else(wsum > 0, osum / wsum, 0)
                        if sid == 0 and c == 0:
                            Lse[b, head0 + i] = T.if_then_else(top == neg_inf, neg_inf, (top + T.log2(wsum)) * _LN2)
            elif nsplit == 1:
                for d, i in T.Parallel(dim_v, heads):
                    if i < group:
                        Out[b, head0 + i, d] = o_t[d, i]
                for i in T.Parallel(heads):
                    if i < group:
                        Lse[b, head0 + i] = m_i[i] * _LN2
            else:
                for d, i in T.Parallel(dim_v, heads):
                    if i < group:
                        Opart[b, head0 + i, sid, d] = o_t[d, i]
                for i in T.Parallel(heads):
                    if i < group:
                        Lpart[b, head0 + i, sid] = m_i[i]
                # Publish the partials, then count this split as done: the count is an acq-rel
                # atomic after a barrier over the warpgroup, so it releases every thread's
                # partials (release is cumulative over the barrier; CUTLASS's split-K
                # semaphore is the same pattern) and no thread needs a fence of its own.
                consumer_sync()
                # Lane 0 counts; warp 0 shares the count by shuffle and every lane of it
                # stores the same flag (same values: no single-thread branch).
                if tx < 32:
                    prev = T.if_then_else(
                        tx == 0, T.atomic_add(sem[b * hkv + hk], 1, memory_order="acq_rel", return_prev=True), 0
                    )
                    flag[0] = T.if_then_else(T.shfl_sync(prev, 0) == nsplit - 1, 1, 0)
                consumer_sync()
                if flag[0] == 1:
                    # The counting atomic acquired every split's partials, and the barrier
                    # above orders it before the loads below on every thread: no fence.
                    if tx == 0:
                        sem[b * hkv + hk] = 0  # every split has counted: ready for the next launch
                    # Online combine, one pass, no shared memory: each thread owns _COLS
                    # adjacent columns of one row (a group of 8 at Dv 128 is one round for
                    # the warpgroup) and folds the splits in 16 at a time, rescaling what it
                    # holds as the running max grows (the split loop's online softmax, over
                    # whole splits). All 16 log-sum-exps and partial rows of a step are
                    # loaded before any is used: the loads are unconditional (the index is
                    # clamped; a split past the last is masked to weight 0), so they are in
                    # flight together. Guarded loads went out one L2 round trip at a time:
                    # 9 us of the 22 us in-kernel at batch 1 x 32k x 90%.
                    pieces = group * (dim_v // _COLS)
                    for e in T.serial(T.ceildiv(pieces, _THREADS)):
                        if e * _THREADS + tx < pieces:
                            row = (e * _THREADS + tx) // (dim_v // _COLS)
                            col = (e * _THREADS + tx) % (dim_v // _COLS) * _COLS
                            run_m = T.alloc_var(acc)
                            run_l = T.alloc_var(acc)
                            new_m = T.alloc_var(acc)
                            run_m = neg_inf
                            run_l = 0
                            for v in T.vectorized(_COLS):
                                acc_c[v] = 0
                            for t0 in T.serial(T.ceildiv(nsplit, 16)):
                                for u in T.unroll(16):
                                    lses[u] = Lpart[b, head0 + row, T.min(t0 * 16 + u, nsplit - 1)]
                                    for v in T.vectorized(_COLS):
                                        parts[u * _COLS + v] = Opart[b, head0 + row, T.min(t0 * 16 + u, nsplit - 1), col + v]
                                for u in T.unroll(16):
                                    lses[u] = T.if_then_else(t0 * 16 + u < nsplit, lses[u], neg_inf)
                                new_m = run_m
                                for u in T.unroll(16):
                                    new_m = T.max(new_m, lses[u])
                                # A row with nothing yet stays at -inf: shift by 0, not NaN.
                                m_use = T.if_then_else(new_m == neg_inf, 0, new_m)
                                rescale = T.exp2(run_m - m_use)
                                run_l = run_l * rescale
                                for v in T.vectorized(_COLS):
                                    acc_c[v] = acc_c[v] * rescale
                                for u in T.unroll(16):
                                    w = T.exp2(lses[u] - m_use)
                                    run_l = run_l + w
                                    for v in T.vectorized(_COLS):
                                        acc_c[v] += w * parts[u * _COLS + v]
                                run_m = new_m
                            for v in T.vectorized(_COLS):
                                Out[b, head0 + row, col + v] = T.if_then_else(run_l > 0, acc_c[v] / run_l, 0)
                            if col == 0:
                                Lse[b, head0 + row] = T.if_then_else(
                                    run_m == neg_inf, neg_inf, (run_m + T.log2(run_l)) * _LN2
                                )

    return sparse_decode_kernel


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(units: int, slots: int, max_tiles: int, num_sms: int) -> int:
    """Splits per (row, KV head), from shapes only (no sync), with no split owning more than
    _LIST of the ``slots`` index slots and none past one tile each.

    When the (row, KV head) units fit in one wave, as many splits as keep them in one
    wave: every SM then pulls its share of HBM, and at batch 1 (8 units on 132 SMs) 16
    splits beat 15 (104 vs 108 us at 128k x 50%) and 6 (13.6 vs 15.0 us at 8k x 90%; H100,
    fp16, CUDA graph). Otherwise the fewest splits that fill the waves about as evenly as
    any count can."""
    least = max(1, math.ceil(slots / _LIST))
    most = max(least, min(_MAX_SPLITS, max_tiles))
    if units * least <= num_sms:
        return max(least, min(most, num_sms // units))

    def efficiency(n: int) -> float:
        ctas = units * n
        return ctas / (math.ceil(ctas / num_sms) * num_sms)

    best = max(efficiency(n) for n in range(least, most + 1))
    return next(n for n in range(least, most + 1) if efficiency(n) >= 0.9 * best)


def _cluster_size(units: int, slots: int, max_tiles: int, num_sms: int, heads: int, dim_v: int) -> int:
    """The cluster size (= split count) of the distributed-shared-memory combine for a
    launch of ``units`` (row, KV head) pairs, or 1 for the combine through global memory.

    The larger of 8 and 4 whose clusters stay within half the SMs (so that they are
    resident together; see :data:`_CLUSTERS`) and still cover a third of them: every CTA
    keeps at most 128 KiB of K/V in flight, and fewer CTAs than that leave HBM idle on
    long rows. The split count is capped by the cluster (8 rather than the 16 a batch of 8
    units would otherwise get), which the cheaper combine more than repays at batch 1 and
    2 with 8 KV heads on an H100. Also 1 when a split would own more than ``_LIST`` slots,
    a split would get no tile, or the exchange buffers would not fit (heads x Dv over
    :data:`_CLUSTER_ELEMS`)."""
    if heads * dim_v > _CLUSTER_ELEMS:
        return 1
    least = max(1, math.ceil(slots / _LIST))
    for size in _CLUSTERS:
        fits = units * size <= num_sms // 2 and units * size >= num_sms // 3
        # Each CTA of the cluster combines an equal slice of the Dv columns.
        if fits and least <= size <= max_tiles and dim_v % size == 0:
            return size
    return 1


def _plan(units: int, slots: int, smax: int, block_size: int, num_sms: int, heads: int, dim_v: int) -> tuple[int, int]:
    """(split count, cluster size) of a launch over ``units`` (row, KV head) pairs with
    ``slots`` index slots each and caches of ``smax`` tokens: from shapes only (no sync)."""
    max_tiles = min(slots, math.ceil(smax / block_size)) * (block_size // _tile(block_size))
    cluster = _cluster_size(units, slots, max_tiles, num_sms, heads, dim_v)
    return (cluster if cluster > 1 else _num_splits(units, slots, max_tiles, num_sms)), cluster


# Per (device, stream): the split counters. The split that combines resets its counter, so
# they are zero between launches and a call costs no memset (1.5 us at batch 16 in a CUDA
# graph, where the memset is a node of its own).
_counters: dict[tuple[int, int], torch.Tensor] = {}
# Per device: zeroed counters that calls under a CUDA-graph capture take, a fresh slice per
# call, so each captured launch owns its counters (replays of different graphs may run
# concurrently) without a memset node. Allocated with the first eager call's counters
# (memory allocated during a capture belongs to that graph's pool); 4 MiB serve, e.g.,
# 8192 captured calls of batch 16 x 8 KV heads. When it runs out, or no eager call came
# first, a capture zeroes counters of its own (a memset node).
_RESERVOIR_INTS = 1 << 20
_reservoirs: dict[int, list] = {}
_reservoir_lock = threading.Lock()


def _kept_zeros(device: torch.device, size: int) -> torch.Tensor:
    """Zeros the module keeps for the process, allocated by a thread of their own: under
    torch.compile's CUDA graphs the warm-up runs, not only the captures, allocate from the
    graphs' memory pool (for the whole thread, whatever the stream), and a tensor kept from
    there is one the pool does not track: cudagraph trees then refuse to run."""
    box: list = []

    def allocate() -> None:
        try:
            # A side stream of the worker's own, not its default (legacy) stream: legacy-stream
            # work would order against, or break, a capture running in another thread.
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                buf = torch.zeros(size, dtype=torch.int32, device=device)
            stream.synchronize()  # zero before any launch reads it
            box.append(buf)
        except Exception as exc:  # noqa: BLE001 - re-raised in the calling thread
            box.append(exc)

    worker = threading.Thread(target=allocate, name="seerattn-kept-zeros")
    worker.start()
    worker.join()
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


# Kept buffers that a larger one replaced: launches still in flight may use them, and the
# allocator knows only the worker's side stream as theirs, so they are never freed.
_retired: list[torch.Tensor] = []


def _kept_at_least(store: dict, key, device: torch.device, size: int) -> torch.Tensor:
    """``store[key]``, replaced by a larger kept buffer (:func:`_kept_zeros`) when it holds
    fewer than ``size`` elements."""
    buf = store.get(key)
    if buf is None or buf.numel() < size:
        if buf is not None:
            _retired.append(buf)
        buf = store[key] = _kept_zeros(device, max(size, 4096))
    return buf


def _counter(device: torch.device, size: int) -> torch.Tensor:
    if torch.cuda.is_current_stream_capturing():
        with _reservoir_lock:
            reservoir = _reservoirs.get(device.index)
            if reservoir is not None and reservoir[1] + size <= reservoir[0].numel():
                start = reservoir[1]
                reservoir[1] += size
                return reservoir[0][start : start + size]
        return torch.zeros(size, dtype=torch.int32, device=device)
    buf = _kept_at_least(_counters, (device.index, torch.cuda.current_stream(device).cuda_stream), device, size)
    if device.index not in _reservoirs:
        _reservoirs[device.index] = [_kept_zeros(device, _RESERVOIR_INTS), 0]
    return buf


# Per device: zeros read as cache_offsets when none are given (never written).
_zero_offsets: dict[int, torch.Tensor] = {}


def _zeros(device: torch.device, size: int) -> torch.Tensor:
    buf = _zero_offsets.get(device.index)
    if (buf is None or buf.numel() < size) and torch.cuda.is_current_stream_capturing():
        return torch.zeros(size, dtype=torch.int32, device=device)  # not kept: see _counter
    return _kept_at_least(_zero_offsets, device.index, device, size)[:size]


def _unsupported(q, k_cache, v_cache, block_indices, block_size) -> str | None:
    """Why these arguments take the Triton kernel instead; None when this kernel runs."""
    hq, hkv = q.shape[1], k_cache.shape[2]
    if q.dtype not in _TILELANG_DTYPES:
        return f"dtype {q.dtype}"
    if block_indices.shape[1] != hkv:
        return "per-query-head block_indices [B, Hq, M]"
    if hq // hkv > _HEADS[-1]:
        return f"GQA group {hq // hkv} > {_HEADS[-1]}"
    if q.shape[2] not in (64, 128, 256) or v_cache.shape[3] not in (64, 128, 256):
        return "head dim not in (64, 128, 256)"
    if math.ceil(k_cache.shape[1] / block_size) > MAX_BLOCKS:
        return f"more than {MAX_BLOCKS} blocks per row"
    if math.ceil(block_indices.shape[2] / _LIST) > _MAX_SPLITS:
        return f"more than {_LIST * _MAX_SPLITS} index slots per row"
    for cache in (k_cache, v_cache):  # TMA: 16-byte aligned base and strides
        if cache.data_ptr() % 16 or any(s * cache.element_size() % 16 for s in cache.stride()[:3]):
            return "K/V cache base or strides not 16-byte aligned (TMA)"
    return None


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    sm_scale: float,
    cache_offsets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse decode attention on Hopper; the contract is
    :func:`seerattn_r.ops.sparse_decode` (arguments already validated there).

    Args:
        q: ``[B, Hq, D]`` fp16/bf16, one query token per row.
        k_cache: ``[B, Smax, Hkv, D]``, any strides with the last dim contiguous (a
            transposed ``[B, Hkv, S, D]`` cache works in place; nothing is copied).
        v_cache: ``[B, Smax, Hkv, Dv]``, same rules.
        cache_seqlens: ``[B]`` int32, tokens per row.
        block_indices: ``[B, Hkv, M]`` int32, block ids in any order; ``-1``, duplicates
            and ids at or past ``ceil(cache_seqlens / block_size)`` contribute nothing.
        block_size: tokens per block.
        sm_scale: softmax scale.
        cache_offsets: ``[B]`` int32 or None; row ``b``'s token ``t`` is
            ``cache[b, cache_offsets[b] + t]``.

    Returns:
        ``(out [B, Hq, Dv] q.dtype, lse [B, Hq] float32)``, natural-log LSE; a head with
        no valid token gets zeros and ``-inf``.

    Runs the Triton kernel (same contract) instead for what this one does not cover:
    per-query-head indices ``[B, Hq, M]``, fp32, GQA groups over 64, more than 8192
    blocks per row (512k tokens at block size 64), more than 65536 index slots per row,
    and caches whose base or strides are not 16-byte aligned (TMA). A row shorter than
    one block with ``cache_offsets`` may read its left padding with zero weight, so that
    padding must hold finite values (as a cache a model wrote does); nothing past a row's
    last token is read. Compiles once per (dtype, D, Dv, block_size, GQA group padded to
    8/16/32/64, combine cluster size 1/4/8, GPU arch); lengths, strides, ``M``, offsets
    and the split count are run-time values, and batch sizes share a kernel except where
    they change the cluster size (at small batch).
    """
    if _unsupported(q, k_cache, v_cache, block_indices, block_size) is not None:
        from seerattn_r.kernels.triton.sparse_decode import sparse_decode as triton_sparse_decode

        return triton_sparse_decode(
            q, k_cache, v_cache, cache_seqlens, block_indices, block_size, sm_scale, cache_offsets
        )
    batch, hq, dim = q.shape
    smax, hkv, dim_v = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    device = q.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", index)
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major}{minor}a" if major >= 9 else f"sm_{major}{minor}"
    heads = _heads(hq // hkv)
    splits, cluster = _plan(batch * hkv, block_indices.shape[2], smax, block_size, _sm_count(index), heads, dim_v)
    kernel = _build(_TILELANG_DTYPES[q.dtype], dim, dim_v, block_size, heads, cluster, arch)
    out = torch.empty(batch, hq, dim_v, dtype=q.dtype, device=device)
    lse = torch.empty(batch, hq, dtype=torch.float32, device=device)
    # The split count travels as this workspace's shape (unused with one split or clusters).
    o_part = torch.empty(batch, hq, splits, dim_v, dtype=torch.float32, device=device)
    lse_part = torch.empty(batch, hq, splits, dtype=torch.float32, device=device)
    seqlens = cache_seqlens.contiguous()
    kernel(
        q.contiguous(),
        k_cache,
        v_cache,
        seqlens,
        _zeros(device, batch) if cache_offsets is None else cache_offsets.contiguous(),
        block_indices.contiguous(),
        sm_scale * _LOG2E,
        hq // hkv,
        out,
        lse,
        o_part,
        lse_part,
        # A clustered launch never touches the split counters: no reservoir slice for it.
        _counter(device, batch * hkv) if cluster == 1 else _zeros(device, 1),
    )
    return out, lse
