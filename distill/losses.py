"""Distillation losses for image-text students. Every function takes L2-normalized features (B, D).

`logit_scale` is always the scale itself (what open_clip's forward returns, already exponentiated), i.e. 1 / tau.
"""

from collections.abc import Sequence

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["clip_loss", "ensemble_kd_loss", "affinity_mimicking_loss", "feature_distillation_loss",
           "soft_cross_entropy"]


def soft_cross_entropy(target_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-sum_j p_ij log softmax(logits)_ij, averaged over rows i. (B, N) each -> scalar."""
    return -(target_probs * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
              ) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al., 2021): (CE(s I T^T, diag) + CE(s T I^T, diag)) / 2.

    open_clip's `ClipLoss`; under torch.distributed the features of every process are gathered (with gradients for
    the local part), so each process contrasts against the global batch.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        loss = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=dist.get_rank(),
                                  world_size=dist.get_world_size())
    else:
        loss = open_clip.ClipLoss()
    return loss(image_features, text_features, logit_scale)


def ensemble_kd_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    teacher_image_features: Sequence[torch.Tensor],
    teacher_text_features: Sequence[torch.Tensor],
    teacher_logit_scales: Sequence[float],
) -> torch.Tensor:
    """MobileCLIP's multi-modal reinforced-training KD (Vasu et al., CVPR 2024, eq. 2).

    For each teacher k with scale s_k: P_k = softmax(s_k * A_k I_k^T) over texts for each image (and over images for
    each text); the targets are the mean of P_k over teachers, taken after the softmax. The student's logits are
    s * I T^T. Loss = (CE(P_img->txt, student img->txt) + CE(P_txt->img, student txt->img)) / 2.
    With one teacher this is the `distill_loss` term of open_clip's `DistillClipLoss`.
    """
    if not (len(teacher_image_features) == len(teacher_text_features) == len(teacher_logit_scales) > 0):
        raise ValueError("need the same (non-zero) number of teacher image features, text features and scales")
    logits_per_image = logit_scale * image_features @ text_features.T  # (B, B)
    target_i2t = torch.zeros_like(logits_per_image)
    target_t2i = torch.zeros_like(logits_per_image)
    for t_image, t_text, scale in zip(teacher_image_features, teacher_text_features, teacher_logit_scales):
        t_logits = scale * t_image.float() @ t_text.float().T  # (B, B)
        target_i2t += t_logits.softmax(dim=1)
        target_t2i += t_logits.T.softmax(dim=1)
    n = len(teacher_logit_scales)
    return (soft_cross_entropy(target_i2t / n, logits_per_image)
            + soft_cross_entropy(target_t2i / n, logits_per_image.T)) / 2


def affinity_mimicking_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    teacher_image_features: torch.Tensor,
    teacher_text_features: torch.Tensor,
    logit_scale: float = 50.0,
    teacher_logit_scale: float | None = None,
) -> torch.Tensor:
    """TinyCLIP's affinity mimicking (Wu et al., ICCV 2023, eq. 1-3).

    Affinities A = softmax(s * I T^T) row-wise (image-to-text) and column-wise (text-to-image), with a fixed scale s
    (50 in the paper) for the student and the teacher's scale (default: the same). The student's affinities are
    pulled to the teacher's: L = (CE(A^t_I2T, A^s_I2T) + CE(A^t_T2I, A^s_T2I)) / 2.
    """
    teacher_logit_scale = logit_scale if teacher_logit_scale is None else teacher_logit_scale
    student = logit_scale * image_features @ text_features.T  # (B, B)
    teacher = teacher_logit_scale * teacher_image_features.float() @ teacher_text_features.float().T  # (B, B)
    return (soft_cross_entropy(teacher.softmax(dim=1), student)
            + soft_cross_entropy(teacher.T.softmax(dim=1), student.T)) / 2


def feature_distillation_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
                              projection: torch.nn.Module | None = None) -> torch.Tensor:
    """CLIP-KD's feature distillation (Yang et al., CVPR 2024): MSE between normalized embeddings.

    When dimensions differ, `projection` (a learned linear map, student dim -> teacher dim) is applied first.
    """
    if projection is not None:
        student_features = F.normalize(projection(student_features), dim=-1)
    if student_features.shape[-1] != teacher_features.shape[-1]:
        raise ValueError(f"student dim {student_features.shape[-1]} != teacher dim {teacher_features.shape[-1]}: "
                         "give a projection")
    return F.mse_loss(student_features, teacher_features.float())
