"""The fast paths of the student step against their slow twins: attention backends swapped
into timm's ViT, and the torch.compile'd student against eager."""

import json

import pytest
import torch
import torch._dynamo

from fastdeit.config.recipes import recipe
from fastdeit.config.schema import ModelConfig, with_section
from fastdeit.models.factory import FastAttention, build_model, choose_attention, compile_model, set_attention
from fastdeit.training.step import Prepared, make_step

TINY = ModelConfig(name="deit_tiny_distilled", patch_size=8, depth=2, embed_dim=32, num_heads=2, drop_path=0.0)
HARD = with_section(recipe("deit"), "distill", mode="hard")  # the step's loss: hard distillation


def model_pair(backend: str):
    torch.manual_seed(0)
    a = build_model(TINY, 5, 32)
    b = build_model(TINY, 5, 32)
    b.load_state_dict(a.state_dict())
    set_attention(b, backend)
    return a, b


@pytest.mark.parametrize("backend", ["math", "triton"])
def test_swapped_attention_matches_timms(backend):
    ref, fast = model_pair(backend)
    keys = set(ref.state_dict())
    assert set(fast.state_dict()) == keys and isinstance(fast.blocks[0].attn, FastAttention)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out_ref, out_fast = ref(x), fast(x)
    for r, f in zip(out_ref, out_fast):
        assert torch.allclose(r, f, atol=1e-5)
    sum(o.sum() for o in out_ref).backward()
    sum(o.sum() for o in out_fast).backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4), name


def test_flex_backend_matches_timms_forward():
    """FlexAttention's forward everywhere (its backward needs CUDA: a GPU test covers it)."""
    ref, fast = model_pair("flex")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.allclose(r, f, atol=1e-4) for r, f in zip(ref(x), fast(x)))


def test_flex_training_on_a_cpu_is_a_clear_error():
    from fastdeit.errors import UserError

    with pytest.raises(UserError, match="CUDA only"):
        choose_attention(build_model(TINY, 5, 32), "flex", 8, torch.float32, torch.device("cpu"), {})


@pytest.mark.gpu
@pytest.mark.slow  # FlexAttention compiles its kernels: last in a GPU window
def test_flex_backend_trains_like_timms_on_a_gpu():
    ref, fast = (m.cuda() for m in model_pair("flex"))
    x = torch.randn(3, 3, 32, 32, device="cuda")
    out_ref, out_fast = ref(x), fast(x)
    sum(o.sum() for o in out_ref).backward()
    sum(o.sum() for o in out_fast).backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-3), name


def test_auto_on_a_cpu_is_sdpa_without_measuring():
    model = build_model(TINY, 5, 32)
    known = {}
    backend, times = choose_attention(model, "auto", 8, torch.float32, torch.device("cpu"), known)
    assert (backend, times) == ("sdpa", {}) and list(known.values()) == ["sdpa"]
    convnet = build_model(ModelConfig(name="resnet10t"), 5, 32)
    assert choose_attention(convnet, "auto", 8, torch.float32, torch.device("cpu"), {}) == (None, {})


def test_compiled_student_matches_eager_and_does_not_recompile():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.softmax(torch.randn(4, 5, generator=g), 1),
                torch.randint(0, 5, (4,), generator=g)) for _ in range(4)]
    losses = {}
    for mode in ("none", "default"):
        torch.manual_seed(0)
        model = build_model(TINY, 5, 32)
        compile_model(model, mode)
        step = make_step(HARD, torch.device("cpu"), None, 5, model=model,
                         optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
        losses[mode] = []
        for k, (x, y, t) in enumerate(batches):
            if k == 1 and mode != "none":
                torch._dynamo.config.error_on_recompile = True  # from the second step on
            losses[mode].append(float(step.update(Prepared(x, y, t, plan=None, bad=()), k + 1)["loss"]))
        torch._dynamo.config.error_on_recompile = False
    assert losses["none"] == pytest.approx(losses["default"], abs=1e-5)
    assert set(model.state_dict()) == set(build_model(TINY, 5, 32).state_dict())  # in-place compile: same keys


def test_train_cli_with_triton_attention_and_compile_matches_eager(tiny_data, tmp_path):
    """`fastdeit train --attn triton` and `--compile` give the losses of the eager SDPA run."""
    from typer.testing import CliRunner

    from fastdeit.cli.commands import app

    from tiny import TINY_MODEL, TINY_RUN

    torch._dynamo.reset()
    losses = {}
    for name, flags in {"eager": ["--attn", "sdpa"], "triton": ["--attn", "triton"],
                        "compiled": ["--attn", "math", "--compile=auto"]}.items():
        out = tmp_path / name
        res = CliRunner().invoke(app, ["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model",
                                       "deit_tiny_distilled", "--out", str(out), "--set", "run.log_every=1",
                                       "--set", "aug.mixup=0.8", *flags])
        assert res.exit_code == 0, res.output + repr(res.exception)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in lines if r["kind"] == "step"]
    assert len(losses["eager"]) == 4
    assert losses["triton"] == pytest.approx(losses["eager"], abs=1e-4)
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-4)
