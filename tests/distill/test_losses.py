import open_clip
import pytest
import torch
import torch.nn.functional as F

from distill.losses import affinity_mimicking_loss, clip_loss, ensemble_kd_loss, feature_distillation_loss


def _features(b=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1)


def test_one_teacher_kd_equals_open_clip_distill_loss():
    image, text = _features(seed=0)
    t_image, t_text = _features(d=24, seed=1)
    ours = ensemble_kd_loss(image, text, torch.tensor(20.0), [t_image], [t_text], [50.0])
    theirs = open_clip.DistillClipLoss()(image, text, torch.tensor(20.0), t_image, t_text, torch.tensor(50.0),
                                         output_dict=True)["distill_loss"]
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def _kd(p_i2t, p_t2i, logits):
    """KD against target probabilities both ways, the student's logits (B, B)."""
    return (-(p_i2t * logits.log_softmax(1)).sum(1).mean() - (p_t2i * logits.T.log_softmax(1)).sum(1).mean()) / 2


def test_ensemble_averages_probabilities_after_the_softmax():
    image, text = _features(seed=0)
    teachers = [_features(d=12, seed=s) for s in (1, 2)]
    scales = [30.0, 70.0]
    loss = ensemble_kd_loss(image, text, 10.0, [t[0] for t in teachers], [t[1] for t in teachers], scales)
    logits = 10.0 * image @ text.T
    after = _kd(sum((s * a @ b.T).softmax(1) for (a, b), s in zip(teachers, scales)) / 2,
                sum((s * b @ a.T).softmax(1) for (a, b), s in zip(teachers, scales)) / 2, logits)
    before = _kd((sum(s * a @ b.T for (a, b), s in zip(teachers, scales)) / 2).softmax(1),
                 (sum(s * b @ a.T for (a, b), s in zip(teachers, scales)) / 2).softmax(1), logits)
    assert loss.item() == pytest.approx(after.item(), rel=1e-6)
    # the same formula with the teachers' logits averaged before the softmax lands elsewhere: the order matters
    assert abs(before.item() - after.item()) > 100 * 1e-6 * abs(after.item())
    assert loss.item() != pytest.approx(before.item(), rel=1e-6)


def test_kd_is_minimal_when_the_student_matches_the_teacher():
    t_image, t_text = _features(seed=3)
    matched = ensemble_kd_loss(t_image, t_text, 40.0, [t_image], [t_text], [40.0])
    other_image, other_text = _features(seed=4)
    assert matched < ensemble_kd_loss(other_image, other_text, 40.0, [t_image], [t_text], [40.0])


def test_affinity_mimicking_uses_fixed_scale_and_teacher_scale_defaults_to_it():
    image, text = _features(seed=0)
    t_image, t_text = _features(seed=1)
    default = affinity_mimicking_loss(image, text, t_image, t_text)
    explicit = affinity_mimicking_loss(image, text, t_image, t_text, logit_scale=50.0, teacher_logit_scale=50.0)
    assert default.item() == pytest.approx(explicit.item())
    s, t = 50.0 * image @ text.T, 50.0 * t_image @ t_text.T
    i2t = -(t.softmax(1) * s.log_softmax(1)).sum(1).mean()
    t2i = -(t.T.softmax(1) * s.T.log_softmax(1)).sum(1).mean()
    expected = (i2t + t2i) / 2
    assert default.item() == pytest.approx(expected.item(), rel=1e-6)


def test_feature_distillation_with_and_without_projection():
    student, _ = _features(d=16, seed=0)
    teacher, _ = _features(d=16, seed=1)
    assert feature_distillation_loss(teacher, teacher).item() == 0.0
    assert feature_distillation_loss(student, teacher).item() == pytest.approx(F.mse_loss(student, teacher).item())
    wide, _ = _features(d=32, seed=2)
    with pytest.raises(ValueError, match="projection"):
        feature_distillation_loss(student, wide)
    projection = torch.nn.Linear(16, 32, bias=False)
    loss = feature_distillation_loss(student, wide, projection)
    loss.backward()
    assert projection.weight.grad is not None and loss.item() > 0


def _clip_loss_on_rank(rank: int, world: int, port: int, image, text, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = slice(rank * len(image) // world, (rank + 1) * len(image) // world)
        mine_image, mine_text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
        loss = clip_loss(mine_image, mine_text, 14.0)
        loss.backward()
        torch.save({"loss": loss.detach(), "image_grad": mine_image.grad, "text_grad": mine_text.grad},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_clip_loss_on_two_processes_is_the_global_batch_loss(tmp_path):
    """Each process's rows against the gathered global batch: the processes' mean loss is one process's loss on
    the whole batch, and each process's feature gradients (the all-gather's backward sums them over processes)
    are the whole-batch gradients of its rows times the process count. Without the gathering each process would
    contrast its rows against its own half only, and both would differ."""
    import socket

    import torch.multiprocessing as mp

    image, text = _features(b=8, seed=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_clip_loss_on_rank, args=(2, port, image, text, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    whole_image, whole_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    whole = clip_loss(whole_image, whole_text, 14.0)
    whole.backward()
    assert whole.item() == pytest.approx(open_clip.ClipLoss()(image, text, 14.0).item())
    assert sum(r["loss"] for r in ranks).item() / 2 == pytest.approx(whole.item(), rel=1e-5)
    for r, result in enumerate(ranks):
        rows = slice(4 * r, 4 * (r + 1))
        assert torch.allclose(result["image_grad"], 2 * whole_image.grad[rows], atol=1e-6)
        assert torch.allclose(result["text_grad"], 2 * whole_text.grad[rows], atol=1e-6)
    local_only = open_clip.ClipLoss()(image[:4], text[:4], 14.0).item()
    assert ranks[0]["loss"].item() != pytest.approx(local_only, rel=1e-3)
