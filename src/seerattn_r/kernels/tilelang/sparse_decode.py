"""Block-sparse flash decoding for Hopper (sm_90) in TileLang.

One launch does everything. A CTA serves one (row ``b``, KV head ``h``, split ``s``):

1. It reads the whole index row ``block_indices[b, h, :]`` into a shared-memory bitmap of
   block ids. The bitmap is what makes the contract cheap: order does not matter,
   duplicates set the same bit, ``-1`` and ids at or past ``ceil(len_b / block_size)``
   are never set. Popcounts and a prefix sum over the bitmap rank the selected blocks
   in ascending order, identically in every CTA of the row, so split ``s`` takes ranks
   ``[N*s/S, N*(s+1)/S)`` of the ``N`` selected blocks: the work is balanced over the
   blocks actually selected, not over the padded index array.
2. Full blocks run through a software-pipelined loop (``T.Pipelined``, TMA loads on
   Hopper) of two wgmma GEMMs, ``Q K^T`` and ``P V``, for the whole GQA group padded to
   the wgmma's M of 64 rows, with an online softmax in fp32 (``exp2``, log2(e) folded
   into the scale). Full blocks need no masking. The one block that can be partial (the
   row's last, when ``len_b % block_size != 0``) ranks last; its owner loads it after the
   loop with per-token guards (tokens past the row read as zeros, their scores as -inf),
   so the cache is never read past a row's tokens.
3. The split's normalised output and log2-sum-exp go to a fp32 workspace; the last CTA of
   ``(b, h)`` to finish (an acquire-release counter, reset by that CTA for the next call)
   combines the splits and writes ``out`` and ``lse``. With one split the CTA writes
   them directly.

What triggers a compile (one kernel per key, cached in memory and in TileLang's on-disk
cache, so a second process loads it): the dtype, ``D``, ``Dv``, the block size and the GPU
architecture. Batch size, cache length (and the caches' strides), the head counts (so the
GQA group), the number of indices ``M``, the offsets and the split count are run-time
values: a decode loop compiles once.
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func's annotations,
# which name the factory's local symbolic dims.
import functools
import math

import torch

# wgmma computes 64 rows per warpgroup: the GQA group is padded to that.
_ROWS = 64
_THREADS = 128
# The block-id bitmap: 2048 words cover 65536 blocks (1M tokens at block size 16).
_BITMAP_WORDS = 2048
MAX_BLOCKS = _BITMAP_WORDS * 32
# A split lists at most this many selected blocks in shared memory; the host picks the
# split count so that no split has more.
_LIST = 1024
# Shared memory for the pipeline stages to fill (the H100/H200 limit is 227 KiB per CTA;
# leave room for the partial-block tiles and barriers).
_SMEM_BUDGET = 200 * 1024
# Keep at least this many tiles per split: fewer and the pipeline never fills.
_MIN_TILES_PER_SPLIT = 2
_MAX_SPLITS = 64
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

_TILELANG_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _tiling(dim: int, dim_v: int, block_size: int) -> tuple[int, int]:
    """(tokens per tile, pipeline stages). A CTA owns its SM (warp specialisation sets
    the register split for one CTA of 256 threads), so the stages take what shared memory
    Q, the bitmap and the block list leave: the more K/V bytes in flight, the closer to
    the bandwidth floor."""
    tile = min(block_size, 64)
    stage_bytes = tile * (dim + dim_v) * 2
    free = _SMEM_BUDGET - _ROWS * dim * 2 - _BITMAP_WORDS * 4 - _LIST * 4 - _ROWS * _MAX_SPLITS * 4
    return tile, max(2, min(6, free // stage_bytes))


@functools.cache
def _build(dtype: str, dim: int, dim_v: int, block_size: int, arch: str):
    """Compile the kernel for one configuration (see the module docstring for the key)."""
    import tilelang

    return tilelang.compile(
        _program(dtype, dim, dim_v, block_size),
        target={"kind": "cuda", "arch": arch},
        pass_configs=_pass_configs(),
    )


def _pass_configs() -> dict:
    import tilelang

    # Warp specialisation stays on (it is what lowers T.Pipelined to TMA + mbarriers):
    # it adds a producer warpgroup, so the kernel runs 256 threads and the code outside
    # the pipelined loop is written to be right on either warpgroup. TileLang's automatic
    # barrier insertion is off: on this kernel it placed barriers inside branches that only
    # some threads take (or refused to build); every barrier the kernel needs is written
    # out, a full one before the warpgroups split and a consumer-only one after.
    return {
        tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True,
        tilelang.PassConfigKey.TL_DISABLE_THREAD_STORAGE_SYNC: True,
    }


def lower_source(dtype: str, dim: int, dim_v: int, block_size: int, arch: str) -> str:
    """CUDA source of one configuration, lowered without nvcc (for the build test)."""
    import tilelang
    import tvm

    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    with tvm.transform.PassContext(config=_pass_configs()), target:
        func = _program(dtype, dim, dim_v, block_size)
        return tilelang.lower(func, target=target, enable_device_compile=False).kernel_source


def _program(dtype: str, dim: int, dim_v: int, block_size: int):
    """The TileLang ``prim_func`` for one configuration (also lowered by the build test)."""
    import tilelang.language as T

    acc = "float32"
    tile, stages = _tiling(dim, dim_v, block_size)
    sub = block_size // tile  # tiles per block
    batch, smax, hkv, hq, m, nsplit, nsem = T.dynamic("batch, smax, hkv, hq, m, nsplit, nsem")
    skb, sks, skh, svb, svs, svh = T.dynamic("skb, sks, skh, svb, svs, svh")
    neg_inf = -T.infinity(acc)

    def consumer_sync():
        # After the pipelined loop only the consumer warpgroup runs (the producer has
        # exited): a named barrier over its 128 threads, never one that waits for all 256.
        T.evaluate(T.call_extern("handle", "tl::__sync_thread_partial", 1, _THREADS))

    @T.macro
    def online_softmax(s, p, o, m_i, m_prev, alpha, l_i, rsum, scale, limit, masked: bool):
        # s holds raw scores; `limit` is the number of valid columns when `masked`.
        for i, j in T.Parallel(_ROWS, tile):
            if masked:
                s[i, j] = T.if_then_else(j < limit, s[i, j] * scale, neg_inf)
            else:
                s[i, j] = s[i, j] * scale
        T.copy(m_i, m_prev)
        T.reduce_max(s, m_i, dim=1, clear=False)
        for i in T.Parallel(_ROWS):
            # m_i is finite here: every tile has at least one valid column.
            alpha[i] = T.exp2(m_prev[i] - m_i[i])
        for i, j in T.Parallel(_ROWS, tile):
            s[i, j] = T.exp2(s[i, j] - m_i[i])
        T.reduce_sum(s, rsum, dim=1)
        for i in T.Parallel(_ROWS):
            l_i[i] = l_i[i] * alpha[i] + rsum[i]
        T.copy(s, p)
        for i, j in T.Parallel(_ROWS, dim_v):
            o[i, j] *= alpha[i]

    @T.prim_func
    def sparse_decode_kernel(
        Q: T.Tensor((batch, hq, dim), dtype),
        K: T.StridedTensor((batch, smax, hkv, dim), (skb, sks, skh, 1), dtype),
        V: T.StridedTensor((batch, smax, hkv, dim_v), (svb, svs, svh, 1), dtype),
        seqlens: T.Tensor((batch,), "int32"),
        offsets: T.Tensor((batch,), "int32"),
        indices: T.Tensor((batch, hkv, m), "int32"),
        scale: T.float32,
        Out: T.Tensor((batch, hq, dim_v), dtype),
        Lse: T.Tensor((batch, hq), acc),
        Opart: T.Tensor((batch, hq, nsplit, dim_v), acc),
        Lpart: T.Tensor((batch, hq, nsplit), acc),
        sem: T.Tensor((nsem,), "int32"),
    ):
        with T.Kernel(nsplit, hkv, batch, threads=_THREADS) as (sid, hk, b):
            tx = T.get_thread_binding()
            bitmap = T.alloc_shared((_BITMAP_WORDS,), "uint32")
            chosen = T.alloc_shared((_LIST,), "int32")
            flag = T.alloc_shared((1,), "int32")
            lse_row = T.alloc_shared((_ROWS,), acc)
            weight = T.alloc_shared((_ROWS * _MAX_SPLITS,), acc)  # combine: per (row, split)
            acc4 = T.alloc_local((4,), acc)
            q_s = T.alloc_shared((_ROWS, dim), dtype)
            k_s = T.alloc_shared((tile, dim), dtype)
            v_s = T.alloc_shared((tile, dim_v), dtype)
            # The partial block's tiles: not the pipelined buffers, which the pipeline owns.
            # Shared-memory planning overlaps them with those (disjoint lifetimes).
            kp_s = T.alloc_shared((tile, dim), dtype)
            vp_s = T.alloc_shared((tile, dim_v), dtype)
            s = T.alloc_fragment((_ROWS, tile), acc)
            p = T.alloc_fragment((_ROWS, tile), dtype)
            o = T.alloc_fragment((_ROWS, dim_v), acc)
            m_i = T.alloc_fragment((_ROWS,), acc)
            m_prev = T.alloc_fragment((_ROWS,), acc)
            alpha = T.alloc_fragment((_ROWS,), acc)
            l_i = T.alloc_fragment((_ROWS,), acc)
            rsum = T.alloc_fragment((_ROWS,), acc)
            run = T.alloc_var("int32", init=0)
            rank = T.alloc_var("int32", init=0)

            off = offsets[b]
            group = hq // hkv
            # Tokens of this row inside the cache; blocks past them are out of range.
            length = T.max(T.min(seqlens[b], smax - off), 0)
            nvalid = T.ceildiv(length, block_size)
            nfull = length // block_size
            nwords = T.ceildiv(nvalid, 32)

            # Warp specialisation runs this setup on both warpgroups (256 threads) while the
            # code is written for 128: every step below is either idempotent when a thread
            # past 127 repeats another's work (zeroing, atomicOr) or limited to warp 0.
            # 1. Bitmap of the selected, in-range block ids (only the row's nwords words).
            for i in T.serial(T.ceildiv(nwords, _THREADS)):
                if i * _THREADS + tx < nwords:
                    bitmap[i * _THREADS + tx] = T.uint32(0)
            T.sync_threads()
            for i in T.serial(T.ceildiv(m, _THREADS)):
                if i * _THREADS + tx < m:
                    blk = indices[b, hk, i * _THREADS + tx]
                    if blk >= 0 and blk < nvalid:
                        # CUDA's atomicOr: T.atomic_or emits a global-only `red` and faults on shared memory.
                        T.evaluate(
                            T.call_extern(
                                "uint32",
                                "atomicOr",
                                T.address_of(bitmap[blk >> 5]),
                                T.shift_left(T.uint32(1), T.Cast("uint32", blk & 31)),
                            )
                        )
            T.sync_threads()
            # The row's last block is partial and selected: it ranks last, after the full ones.
            last_bit = T.if_then_else(
                nfull < nvalid,
                T.Cast("int32", (bitmap[T.max(nvalid - 1, 0) >> 5] >> T.Cast("uint32", (nvalid - 1) & 31)) & T.uint32(1)),
                0,
            )

            # 2. Rank the selected blocks. Lane l of every warp owns a run of `per`
            # consecutive words; a shuffle scan of the runs' popcounts gives each run its first
            # rank and every warp the row's count (kept in registers: no shared broadcast).
            # Warp 0 then lists this split's full blocks in ascending order. No barrier
            # inside: at decode lengths a lane owns one or two words.
            lane = tx % 32
            per = T.ceildiv(nwords, 32)
            for i in T.serial(per):
                if lane * per + i < nwords:
                    run += T.Cast("int32", T.popcount(bitmap[lane * per + i]))
            rank = run
            for d in T.unroll(5):
                # Every lane shuffles (full mask), then a select: no branch around the shuffle.
                up = T.shfl_up(rank, 1 << d)
                rank += T.if_then_else(lane >= (1 << d), up, 0)
            total = T.shfl_sync(rank, 31)  # lane 31's inclusive sum
            rank -= run
            # Split sid takes ranks [lo, hi); hi_full < hi when its range ends with the partial block.
            lo = total * sid // nsplit
            hi = total * (sid + 1) // nsplit
            hi_full = T.min(hi, total - last_bit)
            if tx < 32:
                for i in T.serial(per):
                    w = lane * per + i
                    if w < nwords:
                        word = bitmap[w]
                        if rank < hi_full and rank + T.Cast("int32", T.popcount(word)) > lo:
                            for j in T.unroll(32):
                                # Rank of bit j: the word's first rank plus the set bits below j.
                                r = rank + T.Cast(
                                    "int32", T.popcount(word & (T.shift_left(T.uint32(1), T.uint32(j)) - T.uint32(1)))
                                )
                                if (word >> T.uint32(j)) & T.uint32(1) == T.uint32(1) and r >= lo and r < hi_full:
                                    chosen[r - lo] = w * 32 + j
                        rank += T.Cast("int32", T.popcount(word))
            for i, d in T.Parallel(_ROWS, dim):
                q_s[i, d] = T.if_then_else(i < group, Q[b, hk * group + i, d], 0)
            T.fill(o, 0)
            T.fill(l_i, 0)
            T.fill(m_i, neg_inf)
            T.sync_threads()

            for k in T.Pipelined(T.max(hi_full - lo, 0) * sub, num_stages=stages):
                t0 = off + chosen[k // sub] * block_size + (k % sub) * tile
                T.copy(K[b, t0 : t0 + tile, hk, :], k_s)
                T.clear(s)
                T.gemm(q_s, k_s, s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                online_softmax(s, p, o, m_i, m_prev, alpha, l_i, rsum, scale, tile, False)
                T.copy(V[b, t0 : t0 + tile, hk, :], v_s)
                T.gemm(p, v_s, o, policy=T.GemmWarpPolicy.FullRow)

            # The partial last block: rank total-1, owned by the split whose range ends there.
            if hi_full < hi and lo < hi:
                # Only the tiles holding a token: a tile of nothing but -inf scores would make
                # the online softmax's exp2(m_prev - m_i) NaN.
                for j in T.serial(T.ceildiv(length - (nvalid - 1) * block_size, tile)):
                    first = (nvalid - 1) * block_size + j * tile
                    # The previous tile's wgmma (block size 128: two tiles) is done on every warp.
                    consumer_sync()
                    for i, d in T.Parallel(tile, dim):
                        kp_s[i, d] = T.if_then_else(first + i < length, K[b, off + first + i, hk, d], 0)
                    for i, d in T.Parallel(tile, dim_v):
                        vp_s[i, d] = T.if_then_else(first + i < length, V[b, off + first + i, hk, d], 0)
                    # wgmma reads the whole tile: every warp's stores must land first.
                    consumer_sync()
                    T.clear(s)
                    T.gemm(q_s, kp_s, s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    online_softmax(s, p, o, m_i, m_prev, alpha, l_i, rsum, scale, length - first, True)
                    T.gemm(p, vp_s, o, policy=T.GemmWarpPolicy.FullRow)

            # 3. This split's normalised output and log2-sum-exp (-inf: it saw no token).
            for i, d in T.Parallel(_ROWS, dim_v):
                o[i, d] = T.if_then_else(hi > lo, o[i, d] / l_i[i], 0)
            for i in T.Parallel(_ROWS):
                m_i[i] = T.if_then_else(hi > lo, T.log2(l_i[i]) + m_i[i], neg_inf)
            if nsplit == 1:
                for i, d in T.Parallel(_ROWS, dim_v):
                    if i < group:
                        Out[b, hk * group + i, d] = o[i, d]
                for i in T.Parallel(_ROWS):
                    if i < group:
                        Lse[b, hk * group + i] = m_i[i] * _LN2
            else:
                for i, d in T.Parallel(_ROWS, dim_v):
                    if i < group:
                        Opart[b, hk * group + i, sid, d] = o[i, d]
                for i in T.Parallel(_ROWS):
                    if i < group:
                        Lpart[b, hk * group + i, sid] = m_i[i]
                # Publish the partials before counting this split as done.
                T.evaluate(T.call_extern("handle", "__threadfence"))
                consumer_sync()
                # Lane 0 counts; warp 0 shares the count by shuffle and every lane of it
                # stores the same flag and reset (same values: no single-thread branch).
                if tx < 32:
                    prev = T.if_then_else(
                        tx == 0, T.atomic_add(sem[b * hkv + hk], 1, memory_order="acq_rel", return_prev=True), 0
                    )
                    done = T.shfl_sync(prev, 0)
                    flag[0] = T.if_then_else(done == nsplit - 1, 1, 0)
                    if done == nsplit - 1:
                        sem[b * hkv + hk] = 0  # ready for the next launch
                consumer_sync()
                if flag[0] == 1:
                    # The combine reads group x splits x Dv partials from L2 on one CTA: its
                    # cost is load latency, so every step issues its loads in parallel.
                    T.evaluate(T.call_extern("handle", "__threadfence"))
                    pairs = group * nsplit
                    for e in T.serial(T.ceildiv(pairs, _THREADS)):
                        if e * _THREADS + tx < pairs:
                            row = (e * _THREADS + tx) // nsplit
                            weight[e * _THREADS + tx] = Lpart[b, hk * group + row, (e * _THREADS + tx) % nsplit]
                    consumer_sync()
                    if tx < group:
                        mx = T.alloc_var(acc, init=neg_inf)
                        tot = T.alloc_var(acc, init=0)
                        for t in T.serial(nsplit):
                            mx = T.max(mx, weight[tx * nsplit + t])
                        for t in T.serial(nsplit):
                            tot += T.if_then_else(mx == neg_inf, 0, T.exp2(weight[tx * nsplit + t] - mx))
                        row_lse = T.if_then_else(mx == neg_inf, neg_inf, mx + T.log2(tot))
                        lse_row[tx] = row_lse
                        Lse[b, hk * group + tx] = row_lse * _LN2
                    consumer_sync()
                    for e in T.serial(T.ceildiv(pairs, _THREADS)):
                        if e * _THREADS + tx < pairs:
                            row = (e * _THREADS + tx) // nsplit
                            weight[e * _THREADS + tx] = T.if_then_else(
                                lse_row[row] == neg_inf, 0, T.exp2(weight[e * _THREADS + tx] - lse_row[row])
                            )
                    consumer_sync()
                    # Each thread owns 4 adjacent columns of one row; 8 splits' loads in flight.
                    quads = group * (dim_v // 4)
                    for e in T.serial(T.ceildiv(quads, _THREADS)):
                        if e * _THREADS + tx < quads:
                            row = (e * _THREADS + tx) // (dim_v // 4)
                            col = (e * _THREADS + tx) % (dim_v // 4) * 4
                            for v in T.vectorized(4):
                                acc4[v] = 0
                            for t0 in T.serial(T.ceildiv(nsplit, 8)):
                                for u in T.unroll(8):
                                    if t0 * 8 + u < nsplit:
                                        for v in T.vectorized(4):
                                            acc4[v] += (
                                                weight[row * nsplit + t0 * 8 + u]
                                                * Opart[b, hk * group + row, t0 * 8 + u, col + v]
                                            )
                            for v in T.vectorized(4):
                                Out[b, hk * group + row, col + v] = acc4[v]

    return sparse_decode_kernel


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(units: int, max_blocks: int, sub: int, num_sms: int) -> int:
    """Splits per (row, KV head), from shapes only (no sync): the fewest that fill the
    SMs about as evenly as any count can, with at least _MIN_TILES_PER_SPLIT tiles each,
    and enough that no split lists more than _LIST blocks."""
    least = max(1, math.ceil(max_blocks / _LIST))
    most = max(least, min(_MAX_SPLITS, (max_blocks * sub) // _MIN_TILES_PER_SPLIT))

    def efficiency(n: int) -> float:
        ctas = units * n
        return ctas / (math.ceil(ctas / num_sms) * num_sms)

    best = max(efficiency(n) for n in range(least, most + 1))
    return next(n for n in range(least, most + 1) if efficiency(n) >= 0.9 * best)


# Per (device, stream): the split counters, zero between launches (the last split of each
# (row, KV head) resets its own). One buffer per stream so concurrent launches never share.
_counters: dict[tuple[int, int], torch.Tensor] = {}


def _counter(device: torch.device, size: int) -> torch.Tensor:
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    buf = _counters.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf


# Per device: zeros read as cache_offsets when none are given (never written).
_zero_offsets: dict[int, torch.Tensor] = {}


def _zeros(device: torch.device, size: int) -> torch.Tensor:
    buf = _zero_offsets.get(device.index)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
        _zero_offsets[device.index] = buf
    return buf[:size]


def _unsupported(q, k_cache, v_cache, block_indices, block_size) -> str | None:
    """Why these arguments take the Triton kernel instead; None when this kernel runs."""
    hq, hkv = q.shape[1], k_cache.shape[2]
    if q.dtype not in _TILELANG_DTYPES:
        return f"dtype {q.dtype}"
    if block_indices.shape[1] != hkv:
        return "per-query-head block_indices [B, Hq, M]"
    if hq // hkv > _ROWS:
        return f"GQA group {hq // hkv} > {_ROWS}"
    if q.shape[2] not in (64, 128, 256) or v_cache.shape[3] not in (64, 128, 256):
        return "head dim not in (64, 128, 256)"
    if math.ceil(k_cache.shape[1] / block_size) > MAX_BLOCKS:
        return f"more than {MAX_BLOCKS} blocks per row"
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
    per-query-head indices ``[B, Hq, M]``, fp32, GQA groups over 64, more than 65536
    blocks per row, and caches whose base or strides are not 16-byte aligned (TMA).
    Compiles once per (dtype, D, Dv, block_size, GPU arch); batch, lengths, strides,
    ``Hq``, ``Hkv``, ``M``, offsets and the split count are run-time values.
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
    kernel = _build(_TILELANG_DTYPES[q.dtype], dim, dim_v, block_size, arch)

    tile, _ = _tiling(dim, dim_v, block_size)
    max_blocks = min(block_indices.shape[2], math.ceil(smax / block_size))
    splits = _num_splits(batch * hkv, max_blocks, block_size // tile, _sm_count(index))
    out = torch.empty(batch, hq, dim_v, dtype=q.dtype, device=device)
    lse = torch.empty(batch, hq, dtype=torch.float32, device=device)
    # The split count travels as this workspace's shape (with one split it stays unused).
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
        out,
        lse,
        o_part,
        lse_part,
        _counter(device, batch * hkv),
    )
    return out, lse
