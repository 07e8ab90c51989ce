"""Fused attention for ViTs: a Triton kernel (forward and backward), its references, a dispatch.

The Triton kernel is non-causal FlashAttention (Dao, 2023) written for ViT shapes: any
sequence length (198 tokens for DeiT at 224 px with the distillation token, 578 at 384: the
tail block is masked), head dim 32, 64 or 128, fp16/bf16 (and fp32) inputs with fp32
accumulation. The forward keeps the row log-sum-exp; the backward recomputes the attention
probabilities block by block (one kernel for dK/dV, one for dQ), so memory stays O(N).

Backends, by name:
  triton  the kernel above (CUDA; on a CPU only under TRITON_INTERPRET=1, for the tests)
  sdpa    torch.nn.functional.scaled_dot_product_attention (flash / cuDNN / efficient / math)
  flex    torch's FlexAttention, compiled
  math    softmax(q kᵀ · scale) v written out in torch: the plain reference
`reference_attention` computes the same in float64: the tests' oracle.

Set TRITON_INTERPRET=1 before importing this module to run the kernel on a CPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastdeit.config.schema import AttnBackend, choices

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = tuple(b for b in choices(AttnBackend) if b != "auto")  # the config's choices, less the measured one
HEAD_DIMS = (16, 32, 64, 128)
POISON = False  # tests: fill outputs with NaN before each launch, so unwritten elements show
_LOG2E = 1.4426950408889634

if INTERPRET:  # the interpreter runs one config (no autotuning)
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
else:
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in ((128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                                   (64, 32, 4, 4), (128, 128, 8, 2))]


@triton.jit
def _split(bh, H):
    """(b*h index, batch, head) as int64: offsets like b * stride overflow int32 past 2**31
    elements (DeiT-B at 384 px, large eval batches)."""
    bh = bh.to(tl.int64)
    return bh, bh // H, bh % H


@triton.jit
def _at(b, h, idx, dims, sb, sh, sn, sd):
    """Offsets of rows `idx` x head dims `dims` of one (batch, head) in a [B, H, N, D] tensor."""
    return b * sb + h * sh + idx[:, None] * sn + dims[None, :] * sd


@triton.jit
def _tile(ptr, b, h, idx, dims, sb, sh, sn, sd, ok):
    """The [len(idx), D] tile at those rows; rows past the sequence (`ok` false) read as 0."""
    return tl.load(ptr + _at(b, h, idx, dims, sb, sh, sn, sd), mask=ok[:, None], other=0.0)


@triton.autotune(configs=_CONFIGS, key=["N", "HEAD_DIM"])
@triton.jit
def _fwd_kernel(Q, K, V, OUT, LSE, qk_scale, N, H,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # torch.compile passes Python floats as fp64 scalars: fp64 math here would change the loop's types
    qk_scale = tl.cast(qk_scale, tl.float32)
    # (batch x head) on grid axis 0, which holds 2**31 - 1 programs (axes 1 and 2 hold 65,535)
    bh, b, h = _split(tl.program_id(0), H)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    cols0 = tl.arange(0, BLOCK_N)
    row_ok = rows < N
    q = _tile(Q, b, h, rows, dims, sqb, sqh, sqn, sqd, row_ok)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        col_ok = cols < N
        kt = tl.load(K + b * skb + h * skh + cols[None, :] * skn + dims[:, None] * skd, mask=col_ok[None, :],
                     other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V, b, h, cols, dims, svb, svh, svn, svd, col_ok)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(OUT + _at(b, h, rows, dims, sob, soh, son, sod), acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + bh * N + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _delta_kernel(OUT, DO, DELTA, N, H, sob, soh, son, sod, sdb, sdh, sdn, sdd,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # (batch x head) on grid axis 0, which holds 2**31 - 1 programs (axes 1 and 2 hold 65,535)
    bh, b, h = _split(tl.program_id(0), H)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    ok = rows < N
    o = _tile(OUT, b, h, rows, dims, sob, soh, son, sod, ok)
    do = _tile(DO, b, h, rows, dims, sdb, sdh, sdn, sdd, ok)
    tl.store(DELTA + bh * N + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.autotune(configs=_CONFIGS, key=["N", "HEAD_DIM"])
@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, N, H,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd, sgb, sgh, sgn, sgd,
                 HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # torch.compile passes Python floats as fp64 scalars: fp64 math here would change the loop's types
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    bh, b, h = _split(tl.program_id(0), H)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    rows0 = tl.arange(0, BLOCK_M)
    col_ok = cols < N
    k = _tile(K, b, h, cols, dims, skb, skh, skn, skd, col_ok)
    v = _tile(V, b, h, cols, dims, svb, svh, svn, svd, col_ok)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + rows0
        row_ok = rows < N
        q = _tile(Q, b, h, rows, dims, sqb, sqh, sqn, sqd, row_ok)
        do = _tile(DO, b, h, rows, dims, sdb, sdh, sdn, sdd, row_ok)
        lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = _at(b, h, cols, dims, sgb, sgh, sgn, sgd)
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.autotune(configs=_CONFIGS, key=["N", "HEAD_DIM"])
@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale, N, H,
               sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd, sgb, sgh, sgn, sgd,
               HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # torch.compile passes Python floats as fp64 scalars: fp64 math here would change the loop's types
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    # (batch x head) on grid axis 0, which holds 2**31 - 1 programs (axes 1 and 2 hold 65,535)
    bh, b, h = _split(tl.program_id(0), H)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    cols0 = tl.arange(0, BLOCK_N)
    row_ok = rows < N
    q = _tile(Q, b, h, rows, dims, sqb, sqh, sqn, sqd, row_ok)
    do = _tile(DO, b, h, rows, dims, sdb, sdh, sdn, sdd, row_ok)
    lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        col_ok = cols < N
        k = _tile(K, b, h, cols, dims, skb, skh, skn, skd, col_ok)
        v = _tile(V, b, h, cols, dims, svb, svh, svn, svd, col_ok)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + _at(b, h, rows, dims, sgb, sgh, sgn, sgd), (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE products (the tests compare them to float64); halves use tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _empty(like: torch.Tensor, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None):
    out = torch.empty(shape or like.shape, dtype=dtype or like.dtype, device=like.device)
    if POISON:
        out.fill_(float("nan"))
    return out


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def grid_for(batch_heads: int, tokens: int, block: int) -> tuple[int, int]:
    """(batch x head, row blocks): the first grid axis takes any count a GPU can hold, the
    second (at most 65,535) only ceil(tokens / block)."""
    return batch_heads, triton.cdiv(tokens, block)


# The kernels as custom operators: torch.compile traces a student that uses them into one
# graph (fullgraph). On a GPU they are triton_ops, so Inductor sees the Triton kernels
# themselves; under the interpreter, whose kernels cannot run on fake tensors, opaque
# custom ops with their shapes given below.
_custom_op = torch.library.custom_op if INTERPRET else torch.library.triton_op


@_custom_op("fastdeit::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, d = q.shape  # q, k, v: [B, H, N, D]
    o = _empty(q, (b, h, n, d))  # [B, H, N, D]
    lse = _empty(q, (b * h, n), torch.float32)  # [B * H, N]: the row log-sum-exp, for the backward
    torch.library.wrap_triton(_fwd_kernel)[lambda m: grid_for(b * h, n, m["BLOCK_M"])](
        q, k, v, o, lse, scale * _LOG2E, n, h, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        HEAD_DIM=d, PRECISION=_precision(q.dtype))
    return o, lse


@_custom_op("fastdeit::attention_bwd", mutates_args=())
def attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                  do: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, n, d = q.shape
    do = do.contiguous()
    delta = _empty(q, (b * h, n), torch.float32)  # [B * H, N]: rowsum(dO * O)
    torch.library.wrap_triton(_delta_kernel)[grid_for(b * h, n, 64)](o, do, delta, n, h, *_strides(o), *_strides(do),
                                                                     HEAD_DIM=d, BLOCK_M=64)
    dq = _empty(q, (b, h, n, d))
    dk = _empty(k, (b, h, n, d))
    dv = _empty(v, (b, h, n, d))  # contiguous
    args = (scale * _LOG2E, scale, n, h, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq))
    torch.library.wrap_triton(_dkdv_kernel)[lambda m: grid_for(b * h, n, m["BLOCK_N"])](
        q, k, v, do, lse, delta, dk, dv, *args, HEAD_DIM=d, PRECISION=_precision(q.dtype))
    torch.library.wrap_triton(_dq_kernel)[lambda m: grid_for(b * h, n, m["BLOCK_M"])](
        q, k, v, do, lse, delta, dq, *args, HEAD_DIM=d, PRECISION=_precision(q.dtype))
    return dq, dk, dv


def _keep_for_backward(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, do: torch.Tensor, _dlse: torch.Tensor) -> tuple:
    q, k, v, o, lse = ctx.saved_tensors
    return (*attention_bwd(q, k, v, o, lse, do, ctx.scale), None)


attention_fwd.register_autograd(_backward, setup_context=_keep_for_backward)

if INTERPRET:

    @attention_fwd.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, n, d = q.shape
        return q.new_empty(b, h, n, d), q.new_empty(b * h, n, dtype=torch.float32)

    @attention_bwd.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q, k, v: [batch, heads, tokens, head_dim], any strides; head_dim in HEAD_DIMS."""
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"the Triton kernel takes head dims {HEAD_DIMS}, not {q.shape[-1]}")
    if not INTERPRET and q.device.type != "cuda":
        raise RuntimeError("the Triton attention kernel needs a CUDA device (or TRITON_INTERPRET=1 for tests)")
    return attention_fwd(q, k, v, scale if scale is not None else q.shape[-1] ** -0.5)[0]


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)  # [B, H, N, D] @ [B, H, D, N] -> [B, H, N, N]
    return attn.softmax(dim=-1) @ v  # [B, H, N, D]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """The oracle: math_attention in float64."""
    return math_attention(q.double(), k.double(), v.double(), scale)


_flex = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention as fa

        _flex = torch.compile(fa, dynamic=False)
    return _flex(q, k, v, scale=scale)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: AttnBackend = "sdpa",
              scale: float | None = None) -> torch.Tensor:
    """Self-attention with the named backend (see the module docstring)."""
    if backend == "sdpa":
        return sdpa_attention(q, k, v, scale)
    if backend == "triton":
        return triton_attention(q, k, v, scale)
    if backend == "flex":
        return flex_attention(q, k, v, scale)
    if backend == "math":
        return math_attention(q, k, v, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def flops(batch: int, heads: int, tokens: int, head_dim: int, backward: bool = False) -> float:
    """Matmul FLOPs of attention: 2 products of 2·N²·d each forward, 2.5x that backward."""
    fwd = 4.0 * batch * heads * tokens * tokens * head_dim
    return fwd * (3.5 if backward else 1.0)


def _time_fwd_bwd(fn, q, k, v, repeats: int = 10) -> float:
    for _ in range(3):
        fn(q, k, v).sum().backward()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn(q, k, v).sum().backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def pick_backend(batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[str, dict[str, float]]:
    """The fastest backend whose output matches SDPA's on this shape, forward + backward timed
    on the device (milliseconds per call in the dict); measured on every call: the caller
    remembers choices (models.choose_attention). Without CUDA: sdpa, unmeasured (the Triton
    kernel needs a GPU)."""
    if device.type != "cuda":
        return "sdpa", {}
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, generator=g)
               .requires_grad_(True) for _ in range(3))
    want = sdpa_attention(q, k, v).float()
    times: dict[str, float] = {}
    for backend in ("sdpa", "triton", "flex"):
        if backend == "triton" and head_dim not in HEAD_DIMS:
            continue
        try:
            fn = lambda a, b, c, be=backend: attention(a, b, c, be)  # noqa: E731
            got = fn(q, k, v).float()
            if (got - want).abs().max() > 2e-2 * want.abs().max():
                continue  # not correct here: never picked
            times[backend] = _time_fwd_bwd(fn, q, k, v)
        except Exception:  # a backend that cannot run this shape is simply not a candidate
            continue
    return min(times, key=times.get), times
