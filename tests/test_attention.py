"""The Triton attention kernel against float64 math, under TRITON_INTERPRET=1 on a CPU.

Error bounds, relative to the largest reference value (see rel_err): fp32 inputs 1e-5 (forward) and 1e-4
(gradients); fp16 inputs 5e-3 and 2e-2 (fp16 rounds to 1e-3 relative; the backward chains
three products). Outputs are poisoned with NaN before each launch, so an element the kernel
did not write fails the comparison.
"""

import pytest
import torch
import triton
import triton.language as tl

from fastdeit.kernels import attention as A

CPU_INTERPRETED = A.INTERPRET or torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CPU_INTERPRETED, reason="needs TRITON_INTERPRET=1 or a GPU")
DEVICE = "cuda" if torch.cuda.is_available() and not A.INTERPRET else "cpu"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(A, "POISON", True)


def qkv(b, h, n, d, dtype, seed=0, layout="timm"):
    """Random q, k, v; layout 'timm' makes them strided views of one packed qkv tensor."""
    g = torch.Generator().manual_seed(seed)
    if layout == "timm":
        x = torch.randn(b, n, 3, h, d, generator=g).to(dtype).to(DEVICE)
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype).to(DEVICE) for _ in range(3))
    return [t.detach().requires_grad_(True) for t in (q, k, v)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest reference value (floored at 1e-2: with one
    token the exact q and k gradients are 0 and only rounding noise is left)."""
    got, want = got.detach(), want.detach()
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) or invalid elements"
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-2))


BOUNDS = {torch.float32: (1e-5, 1e-4), torch.float16: (5e-3, 2e-2)}


# Under Triton's CPU interpreter (minutes of CI), 577 tokens and fp16 beyond 197 repeat what
# the shorter cases cover (several key blocks, a ragged last block); on a GPU every case runs.
CASES = [(n, dtype) for dtype in (torch.float32, torch.float16) for n in (1, 63, 64, 65, 197, 198, 577)
         if torch.cuda.is_available() or (n <= 198 and (dtype == torch.float32 or n <= 197))]


@pytest.mark.parametrize(("n", "dtype"), CASES)
def test_forward_and_backward_match_float64(n, dtype):
    b, h, d = (2, 3, 64) if n < 500 else (1, 1, 64)
    q, k, v = qkv(b, h, n, d, dtype, seed=n)
    out = A.triton_attention(q, k, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    out.backward(g)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = A.reference_attention(q64, k64, v64)
    ref.backward(g.double())
    fwd, bwd = BOUNDS[dtype]
    assert rel_err(out, ref) < fwd
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got, want) < bwd


@pytest.mark.parametrize("d", [32, 128])
def test_other_head_dims_and_contiguous_inputs(d):
    q, k, v = qkv(1, 2, 70, d, torch.float32, seed=d, layout="contiguous")
    out = A.triton_attention(q, k, v)
    out.sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = A.reference_attention(q64, k64, v64)
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-5 and rel_err(k.grad, k64.grad) < 1e-4 and rel_err(q.grad, q64.grad) < 1e-4


def test_unsupported_head_dim_is_refused():
    q, k, v = qkv(1, 1, 8, 48, torch.float32)
    with pytest.raises(ValueError, match="head dims"):
        A.triton_attention(q, k, v)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_torch_backends_match_float64(backend):
    q, k, v = qkv(2, 3, 198, 64, torch.float32, seed=5)
    assert rel_err(A.attention(q, k, v, backend), A.reference_attention(q, k, v)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("n", [197, 198, 577])
def test_bf16_on_the_gpu(n):
    g = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (torch.randn(8, 6, n, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
               for _ in range(3))
    out = A.triton_attention(q, k, v)
    out.backward(torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = A.reference_attention(q64, k64, v64)
    ref.backward(torch.ones_like(ref))
    assert rel_err(out, ref) < 2e-2  # bf16 keeps 8 bits of mantissa
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got, want) < 5e-2



@pytest.mark.gpu
def test_inductor_compiles_the_triton_backward_on_a_gpu():
    """Training compiles the backward too: Inductor places the kernel's backward op in the
    backward graph, and the gradients are those of float64 math."""
    import torch._dynamo

    torch._dynamo.reset()
    q, k, v = qkv(4, 6, 198, 64, torch.bfloat16)
    g = torch.randn(4, 6, 198, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(DEVICE)
    compiled = torch.compile(lambda a, b, c: (A.triton_attention(a, b, c).float() * g).sum(), fullgraph=True)
    compiled(q, k, v).backward()
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    (A.reference_attention(q64, k64, v64) * g.double()).sum().backward()
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got, want) < 5e-2

def test_grid_keeps_batch_times_heads_on_the_unlimited_axis():
    """Grid axes 1 and 2 hold at most 65,535 programs: DeiT-B's 12 heads at an eval batch of
    8,192 already need 98,304 (batch x head) programs."""
    bh, blocks = A.grid_for(8192 * 12, 577, 64)
    assert bh == 98_304 and blocks == 10 <= 65_535


@triton.jit
def _offset_probe(OUT, bh, H, sb, sh):
    _, b, h = A._split(bh, H)
    tl.store(OUT, tl.sum(A._at(b, h, tl.arange(0, 1), tl.arange(0, 1), sb, sh, 0, 0)))


def test_offsets_are_64_bit():
    """b * stride past 2**31 (a [B, H, N, D] tensor of more than 2**31 elements) must not wrap."""
    out = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    bh, heads, sb, sh = 70_000 * 12 + 5, 12, 12 * 577 * 64, 577 * 64
    _offset_probe[(1,)](out, bh, heads, sb, sh)
    assert int(out) == (bh // heads) * sb + (bh % heads) * sh > 2**31


def test_the_compiled_student_with_triton_attention_is_one_graph():
    """The kernel is a custom operator: Dynamo traces a ViT using it without a graph break, and
    the compiled model gives the eager forward and gradients."""
    import torch._dynamo

    from fastdeit.config.schema import ModelConfig
    from fastdeit.models.factory import build_model, set_attention

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="deit_tiny_distilled", patch_size=8, depth=2, embed_dim=32, num_heads=2,
                                    drop_path=0.0), 5, 32).to(DEVICE)
    set_attention(model, "triton")
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for net in (model, compiled):
        model.zero_grad()
        out = net(x)
        sum(o.sum() for o in out).backward()
        results.append(([o.detach() for o in out], [p.grad.clone() for p in model.parameters()]))
    (out_e, grad_e), (out_c, grad_c) = results
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out_e, out_c))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grad_e, grad_c))


@pytest.mark.gpu
def test_inductor_compiles_the_triton_op_on_a_gpu():
    """On a GPU the kernels are triton_ops: Inductor compiles them into the student's graph."""
    import torch._dynamo

    torch._dynamo.reset()
    q, k, v = qkv(4, 6, 198, 64, torch.bfloat16)
    compiled = torch.compile(lambda a, b, c: A.triton_attention(a, b, c), fullgraph=True)
    assert rel_err(compiled(q, k, v), A.reference_attention(q, k, v)) < 2e-2
