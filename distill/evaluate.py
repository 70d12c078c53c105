"""Zero-shot classification and image-text retrieval on a dataset root's split (CLIP_benchmark's protocol).

Zero-shot: each class embedding is the normalized mean of the normalized embeddings of every template filled with
the class name (template ensembling, Radford et al., 2021; open_clip `build_zero_shot_classifier`); images are
assigned the class of highest cosine similarity. Reports top-1, top-5 and mean per-class recall (the mean, over the
classes present in the split, of the fraction of their images classified correctly).

Retrieval: each image's own caption is its one positive. R@k image->text is the fraction of images whose caption is
among the k most similar captions; text->image likewise for captions.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mdcore.errors import UserInputError
from reinforced_data.shards import SkipLog, iter_image_text, read_lines, resolve_shards
from teachers.specs import LoadedModel

__all__ = [
    "EvalData",
    "load_eval_data",
    "zero_shot_metrics",
    "retrieval_metrics",
    "encode_eval_data",
    "evaluate_model",
]


@dataclass
class EvalData:
    images: list  # PIL images
    captions: list[str]
    labels: torch.Tensor  # (N,) long; -1 where a sample has no class
    classnames: list[str]
    templates: list[str]
    skips: SkipLog


def load_eval_data(data_root: str | Path, split: str = "test") -> EvalData:
    """Read a split of a dataset root (the layout CLIP_benchmark's `wds/` loader reads)."""
    root = Path(data_root)
    if not root.is_dir():
        raise UserInputError(f"dataset root not found: {root}")
    if not (root / split).is_dir():
        raise UserInputError(f"dataset root {root} has no split {split!r}")
    classnames = read_lines(root / "classnames.txt")
    templates = read_lines(root / "zeroshot_classification_templates.txt")
    if not all("{c}" in t for t in templates):
        raise UserInputError(f"every template in {root / 'zeroshot_classification_templates.txt'} needs '{{c}}'")
    skips = SkipLog()
    images, captions, labels = [], [], []
    for sample in iter_image_text(resolve_shards(root, split), skips):
        if sample.label is not None and not 0 <= sample.label < len(classnames):
            skips.skip_sample(sample.key, f"cls {sample.label} out of range")
            continue
        images.append(sample.image)
        captions.append(sample.caption)
        labels.append(-1 if sample.label is None else sample.label)
    if not images:
        raise UserInputError(f"no usable samples in {root / split}")
    return EvalData(images, captions, torch.tensor(labels, dtype=torch.long), classnames, templates, skips)


def zero_shot_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """logits (N, C), labels (N,) -> top1, top5, mean_per_class_recall (fractions), num_classes."""
    num_classes = logits.shape[1]
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices  # (N, k)
    correct = topk == labels[:, None]  # (N, k)
    top1 = correct[:, 0].float().mean().item()
    top5 = correct.any(dim=1).float().mean().item()
    present = labels.unique()
    recalls = [correct[labels == c, 0].float().mean().item() for c in present]
    return {"top1": top1, "top5": top5, "mean_per_class_recall": sum(recalls) / len(recalls),
            "num_classes": num_classes}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """Features (N, D) each, normalized, pair i being the positive. Returns R@k for both directions."""
    sim = image_features @ text_features.T  # (N_images, N_texts)
    positives = torch.arange(len(sim))
    # Rank of the positive = how many candidates score strictly higher (ties count in the positive's favour).
    i2t_rank = (sim > sim[positives, positives][:, None]).sum(dim=1)  # (N,)
    t2i_rank = (sim.T > sim[positives, positives][:, None]).sum(dim=1)  # (N,)
    return {
        "image_to_text": {f"R@{k}": (i2t_rank < k).float().mean().item() for k in ks},
        "text_to_image": {f"R@{k}": (t2i_rank < k).float().mean().item() for k in ks},
    }


@torch.no_grad()
def encode_eval_data(loaded: LoadedModel, data: EvalData, batch_size: int = 256, progress: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image features (N, D), caption features (N, D) and the zero-shot classifier (D, C), all normalized."""
    model = loaded.model.eval()
    device = next(model.parameters()).device
    image_features, text_features = [], []
    n = len(data.images)
    for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress, leave=False):
        batch = torch.stack([loaded.preprocess(im) for im in data.images[start:start + batch_size]]).to(device)
        image_features.append(F.normalize(model.encode_image(batch).float(), dim=-1).cpu())
        tokens = loaded.tokenizer(data.captions[start:start + batch_size]).to(device)
        text_features.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer=loaded.tokenizer, classnames=data.classnames,
        templates=[lambda c, t=t: t.format(c=c) for t in data.templates],  # CLIP_benchmark's `{c}` placeholders
        num_classes_per_batch=32, device=device, use_tqdm=False)
    return torch.cat(image_features), torch.cat(text_features), classifier.float().cpu()


def evaluate_model(loaded: LoadedModel, data_root: str | Path, split: str = "test", batch_size: int = 256,
                   progress: bool = True, data: EvalData | None = None) -> dict[str, Any]:
    """The `eval --json` result: zero-shot classification and retrieval on `data_root/split` (`data`: that split,
    already loaded, when several models are evaluated on it)."""
    data = data if data is not None else load_eval_data(data_root, split)
    image_features, text_features, classifier = encode_eval_data(loaded, data, batch_size, progress)
    labelled = data.labels >= 0
    result: dict[str, Any] = {}
    if labelled.any():
        result["zeroshot"] = zero_shot_metrics(image_features[labelled] @ classifier, data.labels[labelled])
    result["retrieval"] = retrieval_metrics(image_features, text_features)
    result["num_samples"] = len(data.images)
    result["split"] = split
    result["model"] = str(loaded.spec)
    result["skipped"] = len(data.skips.samples)
    return result
