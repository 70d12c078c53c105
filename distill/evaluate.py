"""Zero-shot classification and image-text retrieval on a dataset root's split (CLIP_benchmark's protocol).

Zero-shot: each class embedding is the normalized mean of the normalized embeddings of every template filled with
the class name (template ensembling, Radford et al., 2021; open_clip `build_zero_shot_classifier`); images are
assigned the class of highest cosine similarity. Reports top-1, top-5 and mean per-class recall (the mean, over the
classes present in the split, of the fraction of their images classified correctly).

Retrieval: each image's own caption is its one positive. R@k image->text is the fraction of images whose caption is
among the k most similar captions; text->image likewise for captions.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mdcore.errors import UserInputError
from mdcore.names import CLASSNAMES, TEMPLATES
from mdmodels.specs import LoadedModel
from reinforced_data.shards import SkipLog, iter_image_text, read_lines, resolve_shards

__all__ = [
    "EvalBatch",
    "EvalData",
    "load_eval_data",
    "zero_shot_metrics",
    "retrieval_metrics",
    "encode_eval_data",
    "evaluate_model",
]


@dataclass
class EvalData:
    """A split of a dataset root, read as a stream: memory does not grow with the number of images."""

    root: Path
    split: str
    urls: list[str]
    classnames: list[str]
    templates: list[str]
    skips: SkipLog = field(default_factory=SkipLog)  # filled by the first complete pass
    _counted: bool = False

    def batches(self, batch_size: int) -> Iterator["EvalBatch"]:
        """The split in batches of `batch_size` samples."""
        skips = SkipLog() if self._counted else self.skips
        batch: list = []
        for sample in iter_image_text(self.urls, skips):
            if sample.label is not None and not 0 <= sample.label < len(self.classnames):
                skips.skip_sample(sample.key, f"cls {sample.label} out of range", sample.url)
                continue
            batch.append(sample)
            if len(batch) == batch_size:
                yield _columns(batch)
                batch = []
        if batch:
            yield _columns(batch)
        self._counted = True


@dataclass
class EvalBatch:
    images: list  # PIL images
    captions: list[str]
    labels: torch.Tensor  # (B,) class indices, -1 where a sample has no class


def _columns(samples: list) -> EvalBatch:
    labels = torch.tensor([-1 if s.label is None else s.label for s in samples], dtype=torch.long)
    return EvalBatch([s.image for s in samples], [s.caption for s in samples], labels)


def load_eval_data(data_root: str | Path, split: str = "test") -> EvalData:
    """A split of a dataset root (the layout CLIP_benchmark's `wds/` loader reads), checked but not yet read."""
    root = Path(data_root)
    if not root.is_dir():
        raise UserInputError(f"dataset root not found: {root}")
    if not (root / split).is_dir():
        raise UserInputError(f"dataset root {root} has no split {split!r}")
    classnames = read_lines(root / CLASSNAMES)
    templates = read_lines(root / TEMPLATES)
    if not all("{c}" in t for t in templates):
        raise UserInputError(f"every template in {root / TEMPLATES} needs '{{c}}'")
    return EvalData(root, split, resolve_shards(root, split), classnames, templates)


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
                      ks: tuple[int, ...] = (1, 5, 10), chunk: int = 4096) -> dict[str, dict[str, float]]:
    """Features (N, D) each, normalized, pair i being the positive. Returns R@k for both directions.

    Similarities are computed `chunk` rows at a time, so memory is O(chunk * N), not O(N^2)."""
    ranks = {}
    for name, queries, candidates in (("image_to_text", image_features, text_features),
                                      ("text_to_image", text_features, image_features)):
        rank = []
        for start in range(0, len(queries), chunk):
            sim = queries[start:start + chunk] @ candidates.T  # (chunk, N)
            rows = torch.arange(len(sim))
            positive = sim[rows, start + rows]  # (chunk,) from the same product, so ties stay ties
            # Rank of the positive = how many candidates score strictly higher (ties count in its favour).
            rank.append((sim > positive[:, None]).sum(dim=1))
        ranks[name] = {f"R@{k}": (torch.cat(rank) < k).float().mean().item() for k in ks}
    return ranks


@torch.no_grad()
def encode_eval_data(loaded: LoadedModel, data: EvalData, batch_size: int = 256, progress: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image features (N, D), caption features (N, D), labels (N,) and the zero-shot classifier (D, C), the
    features normalized; images are decoded a batch at a time."""
    model = loaded.model.eval()
    device = next(model.parameters()).device
    image_features, text_features, labels = [], [], []
    for batch in tqdm(data.batches(batch_size), desc="eval", disable=not progress, leave=False):
        pixels = torch.stack([loaded.preprocess(im) for im in batch.images]).to(device)
        image_features.append(F.normalize(model.encode_image(pixels).float(), dim=-1).cpu())
        tokens = loaded.tokenizer(batch.captions).to(device)
        text_features.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
        labels.append(batch.labels)
    if not image_features:
        raise UserInputError(f"no usable samples in {data.root / data.split} ({data.skips.summary()})")
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer=loaded.tokenizer, classnames=data.classnames,
        templates=[lambda c, t=t: t.format(c=c) for t in data.templates],  # CLIP_benchmark's `{c}` placeholders
        num_classes_per_batch=32, device=device, use_tqdm=False)
    return torch.cat(image_features), torch.cat(text_features), torch.cat(labels), classifier.float().cpu()


def evaluate_model(loaded: LoadedModel, data_root: str | Path, split: str = "test", batch_size: int = 256,
                   progress: bool = True, data: EvalData | None = None) -> dict[str, Any]:
    """The `eval --json` result: zero-shot classification and retrieval on `data_root/split` (`data`: that split
    from `load_eval_data`, when several models are evaluated on it). `skips` says what could not be read."""
    if batch_size <= 0:
        raise UserInputError(f"batch size must be positive, got {batch_size}")
    data = data if data is not None else load_eval_data(data_root, split)
    image_features, text_features, labels, classifier = encode_eval_data(loaded, data, batch_size, progress)
    labelled = labels >= 0
    result: dict[str, Any] = {}
    if labelled.any():
        result["zeroshot"] = zero_shot_metrics(image_features[labelled] @ classifier, labels[labelled])
    result["retrieval"] = retrieval_metrics(image_features, text_features)
    result["num_samples"] = len(image_features)
    result["split"] = split
    result["model"] = str(loaded.spec)
    result["skipped"] = data.skips.sample_count
    result["skips"] = data.skips.as_dict()
    return result
