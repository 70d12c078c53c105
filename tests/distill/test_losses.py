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


def test_ensemble_averages_probabilities_after_the_softmax():
    image, text = _features(seed=0)
    teachers = [_features(d=12, seed=s) for s in (1, 2)]
    scales = [30.0, 70.0]
    loss = ensemble_kd_loss(image, text, 10.0, [t[0] for t in teachers], [t[1] for t in teachers], scales)
    p_i2t = sum((s * a @ b.T).softmax(1) for (a, b), s in zip(teachers, scales)) / 2
    p_t2i = sum((s * b @ a.T).softmax(1) for (a, b), s in zip(teachers, scales)) / 2
    logits = 10.0 * image @ text.T
    expected = (-(p_i2t * logits.log_softmax(1)).sum(1).mean() - (p_t2i * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # averaging logits instead (before the softmax) gives another number: the order matters
    mixed = sum(s * a @ b.T for (a, b), s in zip(teachers, scales)) / 2
    wrong = (-(mixed.softmax(1) * logits.log_softmax(1)).sum(1).mean()) / 1
    assert abs(wrong.item() - loss.item()) > 1e-3


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


def test_clip_loss_matches_open_clip_on_one_process():
    image, text = _features(seed=5)
    assert clip_loss(image, text, 14.0).item() == pytest.approx(open_clip.ClipLoss()(image, text, 14.0).item())
