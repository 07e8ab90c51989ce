import pytest
import timm
import torch

from fastdeit.config.schema import DistillConfig, ModelConfig
from fastdeit.errors import UserError
from fastdeit.models.factory import build_model, head_logits, is_distilled, load_teacher, timm_name


def test_names():
    assert timm_name("deit_tiny") == "deit_tiny_patch16_224"
    assert timm_name("deit_base_distilled") == "deit_base_distilled_patch16_224"
    assert timm_name("resnet50") == "resnet50"


def test_state_dict_keys_are_timms_official_ones():
    ours = build_model(ModelConfig(name="deit_tiny_distilled"), 1000, 224)
    theirs = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.pos_embed.shape == (1, 2 + 196, 192)


def test_distilled_student_heads():
    m = build_model(ModelConfig(name="deit_tiny_distilled", patch_size=8, depth=1, embed_dim=32, num_heads=2),
                    7, 32)
    x = torch.randn(3, 3, 32, 32)
    m.train()
    cls, dist = m(x)
    assert cls.shape == dist.shape == (3, 7)
    m.eval()
    heads = head_logits(m, x)
    assert torch.allclose(heads["joint"], m(x), atol=1e-6)
    assert torch.allclose(heads["joint"], (heads["cls"] + heads["dist"]) / 2)
    assert is_distilled(m) and m.pos_embed.shape[1] == 2 + 16


def test_official_checkpoint_loads_at_another_size(tmp_path):
    official = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=1000,
                                 depth=2)
    torch.save({"model": official.state_dict()}, tmp_path / "deit.pth")
    cfg = ModelConfig(name="deit_tiny_distilled", depth=2, init=str(tmp_path / "deit.pth"))
    m = build_model(cfg, 10, 128)  # fine-tune: 8x8 grid, 10 classes
    assert m.pos_embed.shape == (1, 2 + 64, 192)
    assert torch.equal(m.blocks[1].mlp.fc1.weight, official.blocks[1].mlp.fc1.weight)
    assert torch.equal(m.dist_token, official.dist_token) and m.head.out_features == 10


def test_unknown_model_and_bad_patch():
    with pytest.raises(UserError, match="unknown model 'deit_huge'"):
        build_model(ModelConfig(name="deit_huge"), 10, 224)
    with pytest.raises(UserError, match=r"not a multiple of .*patch size 16 \(model.patch_size\)"):
        build_model(ModelConfig(name="deit_tiny", patch_size=16), 10, 100)


def test_teacher_from_state_dict_checks_classes(tmp_path):
    t = timm.create_model("resnet10t", num_classes=5)
    torch.save(t.state_dict(), tmp_path / "t.pth")
    teacher = load_teacher(DistillConfig(mode="hard", teacher="resnet10t", teacher_ckpt=str(tmp_path / "t.pth")),
                           5, 32, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(UserError, match="teacher predicts 5 classes but the data has 3"):
        load_teacher(DistillConfig(mode="hard", teacher="resnet10t", teacher_ckpt=str(tmp_path / "t.pth")),
                     3, 32, torch.device("cpu"))
    with pytest.raises(UserError, match="does not name its model"):
        load_teacher(DistillConfig(mode="hard", teacher_ckpt=str(tmp_path / "t.pth")), 5, 32, torch.device("cpu"))
