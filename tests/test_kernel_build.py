"""The Triton attention kernels compile for a Hopper GPU (sm_90) on this CPU machine, with the
argument types that torch.compile gives them: Inductor passes a Python float as an fp64
scalar, and the forward's loop once failed to compile so (found on an H200). Triton's
compiler and its bundled ptxas need no GPU; the compile runs in a fresh process because the
test session imports the kernels under TRITON_INTERPRET=1."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")

SCRIPT = r"""
import json, sys
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastdeit.kernels import attention as A

POINTERS = {"LSE": "*fp32", "DELTA": "*fp32"}  # the rest hold the inputs' dtype
SCALARS = {"qk_scale": "fp64", "sm_scale": "fp64"}  # what Inductor passes for a Python float
CONSTANTS = {"HEAD_DIM": 64, "PRECISION": "tf32", "BLOCK_M": 64, "BLOCK_N": 64}
out = {}
for name in ("_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel"):
    kernel = getattr(A, name)
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner wraps the jitted function
    sig, const = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in CONSTANTS:
            sig[arg], const[(i,)] = "constexpr", CONSTANTS[arg]
        elif arg in SCALARS:
            sig[arg] = SCALARS[arg]
        elif arg in ("N", "H") or arg.islower():  # sizes and strides
            sig[arg] = "i32"
        else:
            sig[arg] = POINTERS.get(arg, "*bf16")
    compiled = compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
    ptx = compiled.asm["ptx"]
    out[name] = {"f64_math": sum(ptx.count(op) for op in ("mul.f64", "fma.rn.f64", "add.f64", "sub.f64")),
                 "cubin_bytes": len(compiled.asm["cubin"])}
json.dump(out, sys.stdout)
"""


def test_kernels_compile_for_sm90_with_inductors_fp64_scalars():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout)
    assert set(built) == {"_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel"}
    for name, info in built.items():
        assert info["cubin_bytes"] > 0, name
        assert info["f64_math"] == 0, f"{name} does fp64 arithmetic: {info}"  # the scales are cast to fp32 first
