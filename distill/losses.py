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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(features: torch.Tensor) -> torch.Tensor:
    """Every process's rows in rank order (B_global, D). Gradients flow back to each process's own rows (the
    all-gather's backward sums them across processes, as open_clip's `gather_with_grad`); a tensor without grad
    is gathered as plain data."""
    if not _distributed():
        return features
    if features.requires_grad:
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(features), dim=0)
    parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, features.contiguous())
    return torch.cat(parts, dim=0)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
              ) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al., 2021): (CE(s I T^T, diag) + CE(s T I^T, diag)) / 2.

    open_clip's `ClipLoss`; under torch.distributed the features of every process are gathered (with gradients for
    the local part), so each process contrasts against the global batch.
    """
    if _distributed():
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

    Under torch.distributed each process holds the rows of its own b samples against the columns of the global
    batch (B = b * world): the mean of the processes' losses is the one-process loss of the global batch.
    """
    if not (len(teacher_image_features) == len(teacher_text_features) == len(teacher_logit_scales) > 0):
        raise ValueError("need the same (non-zero) number of teacher image features, text features and scales")
    logits_i2t = logit_scale * image_features @ _gather(text_features).T  # (b, B)
    logits_t2i = logit_scale * text_features @ _gather(image_features).T  # (b, B)
    target_i2t = torch.zeros_like(logits_i2t)
    target_t2i = torch.zeros_like(logits_t2i)
    for t_image, t_text, scale in zip(teacher_image_features, teacher_text_features, teacher_logit_scales):
        t_image, t_text = t_image.float(), t_text.float()
        target_i2t += (scale * t_image @ _gather(t_text).T).softmax(dim=1)  # (b, B)
        target_t2i += (scale * t_text @ _gather(t_image).T).softmax(dim=1)  # (b, B)
    n = len(teacher_logit_scales)
    return (soft_cross_entropy(target_i2t / n, logits_i2t) + soft_cross_entropy(target_t2i / n, logits_t2i)) / 2


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
    Under torch.distributed, local rows against the global batch's columns (as `ensemble_kd_loss`).
    """
    teacher_logit_scale = logit_scale if teacher_logit_scale is None else teacher_logit_scale
    t_image, t_text = teacher_image_features.float(), teacher_text_features.float()
    student_i2t = logit_scale * image_features @ _gather(text_features).T  # (b, B)
    student_t2i = logit_scale * text_features @ _gather(image_features).T  # (b, B)
    teacher_i2t = teacher_logit_scale * t_image @ _gather(t_text).T  # (b, B)
    teacher_t2i = teacher_logit_scale * t_text @ _gather(t_image).T  # (b, B)
    return (soft_cross_entropy(teacher_i2t.softmax(dim=1), student_i2t)
            + soft_cross_entropy(teacher_t2i.softmax(dim=1), student_t2i)) / 2


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
