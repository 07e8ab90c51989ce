import pytest
import torch

from fastdeit.distill.loss import DistillationLoss


def soft_ce64(logits, targets):
    return (-targets.double() * torch.log_softmax(logits.double(), 1)).sum(1).mean()


def data(b=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls, dist, teacher = (torch.randn(b, c, generator=g) * 3 for _ in range(3))
    targets = torch.softmax(torch.randn(b, c, generator=g), 1)
    return cls, dist, teacher, targets


def test_none_is_the_base_loss_on_the_class_head():
    cls, dist, teacher, targets = data()
    loss, parts = DistillationLoss("none")((cls, dist), targets, teacher)
    assert loss.item() == pytest.approx(soft_ce64(cls, targets).item(), rel=1e-6)
    assert set(parts) == {"loss_base"}
    plain, _ = DistillationLoss("none")(cls, targets)
    assert plain.item() == pytest.approx(loss.item())


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_hard_is_ce_against_teacher_argmax(alpha):
    cls, dist, teacher, targets = data()
    loss, parts = DistillationLoss("hard", alpha=alpha)((cls, dist), targets, teacher)
    labels = teacher.argmax(1)
    kd = -torch.log_softmax(dist.double(), 1)[torch.arange(8), labels].mean()
    expected = (1 - alpha) * soft_ce64(cls, targets) + alpha * kd
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["loss_distill"].item() == pytest.approx(kd.item(), rel=1e-6)
    by_label, _ = DistillationLoss("hard", alpha=alpha)((cls, dist), targets, labels)
    assert by_label.item() == pytest.approx(loss.item())


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_is_the_official_kl(tau):
    cls, dist, teacher, targets = data()
    loss, parts = DistillationLoss("soft", alpha=0.5, tau=tau)((cls, dist), targets, teacher)
    p_t = torch.softmax(teacher.double() / tau, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(dist.double() / tau, 1))).sum()
    kd = kl * tau * tau / dist.numel()
    assert parts["loss_distill"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx((0.5 * soft_ce64(cls, targets) + 0.5 * kd).item(), rel=1e-5)


def test_gradient_reaches_the_right_heads():
    cls, dist, teacher, targets = data()
    cls.requires_grad_(True)
    dist.requires_grad_(True)
    loss, _ = DistillationLoss("hard", alpha=1.0)((cls, dist), targets, teacher)
    loss.backward()
    assert cls.grad.abs().sum() == 0 and dist.grad.abs().sum() > 0


def test_distillation_needs_two_heads_and_teacher():
    cls, dist, teacher, targets = data()
    with pytest.raises(ValueError, match="distillation token"):
        DistillationLoss("hard")(cls, targets, teacher)
    with pytest.raises(ValueError, match="needs teacher outputs"):
        DistillationLoss("soft")((cls, dist), targets, None)


def bce64(logits, targets):
    """float64 BCE against the targets made 0/1 (the official engine's targets.gt(0.0))."""
    x, y = logits.double(), (targets > 0).double()
    return -(y * torch.nn.functional.logsigmoid(x) + (1 - y) * torch.nn.functional.logsigmoid(-x)).mean()


@pytest.mark.parametrize("mode", ["none", "hard"])
def test_bce_base_is_deit3s_binary_cross_entropy_on_binarised_targets(mode):
    """distill.base_loss=bce (DeiT III's --bce-loss): every class with a mixed share > 0 is a
    positive, the rest negatives; distillation wraps it as it wraps the cross-entropy."""
    cls, dist, teacher, _ = data()
    one_hot = torch.eye(5)[torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])]
    targets = 0.7 * one_hot + 0.3 * one_hot.roll(1, 0)  # mixup without smoothing: two positives a row, or one
    loss, parts = DistillationLoss(mode, alpha=0.5, base="bce")((cls, dist), targets, teacher)
    assert parts["loss_base"].item() == pytest.approx(bce64(cls, targets).item(), rel=1e-6)
    if mode == "hard":
        kd = -torch.log_softmax(dist.double(), 1)[torch.arange(8), teacher.argmax(1)].mean()
        assert loss.item() == pytest.approx((0.5 * bce64(cls, targets) + 0.5 * kd).item(), rel=1e-6)
    ce, _ = DistillationLoss(mode, alpha=0.5)((cls, dist), targets, teacher)
    assert ce.item() != pytest.approx(loss.item(), rel=1e-3)  # the key changes the loss
