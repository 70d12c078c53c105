"""`mobiledistill inspect`: a JSON summary of a reinforced dataset and an HTML page to look at it.

The page shows, for a dozen samples, the K stored augmentations replayed on the source image (what the teachers
were shown), the real and synthetic captions, and each caption's cosine similarity to each view under each teacher.
"""

import base64
import html
import io
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF

from mdcore.errors import UserInputError
from reinforced_data.augment import replay_augmentation
from reinforced_data.reader import ReinforcedInfo, open_reinforced, read_info
from reinforced_data.shards import SkipLog, iter_raw_samples
from reinforced_data.storage import stored_dtype

__all__ = ["inspect_reinforced", "write_inspection_html"]


def _teacher_dims(info: ReinforcedInfo, total_dim: int) -> list[dict[str, Any]]:
    """Teachers with their dims; Apple's config gives no dims, so the concatenation is split evenly."""
    teachers = [dict(t) for t in info.teachers] or [{"spec": "unknown", "dim": None, "logit_scale": None}]
    if any(t["dim"] is None for t in teachers):
        for t in teachers:
            t["dim"] = total_dim // len(teachers)
    return teachers


def inspect_reinforced(path: str | Path) -> dict[str, Any]:
    """The design's summary: format, num_samples, num_augs, num_captions (all sets'), caption_sets (key and
    captions of each), teachers, dtype, bytes_per_sample, and skips."""
    info = read_info(path)
    counts = info.config.get("counts")
    skips = SkipLog()
    first = next(iter(open_reinforced(path, skips=skips)), None)  # embeddings suffice: no image shards needed
    if first is None:
        raise UserInputError(f"no readable samples in {path} ({skips.summary()})")
    if isinstance(counts, dict) and type(counts.get("samples")) is int:
        num_samples, bytes_per_sample = counts["samples"], counts.get("bytes_per_sample")
    else:  # Apple's shards carry no counts: read them through
        skips = SkipLog()
        num_samples = sum(1 for _ in open_reinforced(path, skips=skips))
        bytes_per_sample = sum(Path(s).stat().st_size for s in info.shards) / max(1, num_samples)
    return {
        "format": info.format,
        "num_samples": num_samples,
        "num_augs": int(first["image_emb"].shape[0]),
        "num_captions": int(first["text_emb"].shape[0]) - 1,
        "caption_sets": [{"key": key, "captions": count} for key, count in first["caption_sets"].items()],
        "teachers": _teacher_dims(info, int(first["image_emb"].shape[1])),
        "dtype": info.dtype or _guess_dtype(info),
        "bytes_per_sample": round(bytes_per_sample, 1) if isinstance(bytes_per_sample, (int, float)) else None,
        "skips": skips.as_dict(),
    }


def _guess_dtype(info: ReinforcedInfo) -> str | None:
    """The storage dtype of the first sample's embeddings (Apple's configs do not name it)."""
    for raw in iter_raw_samples(info.shards):
        for ext in ("npz", "pth.gz"):
            if ext in raw:
                try:
                    return stored_dtype(ext, raw[ext])
                except ValueError:
                    return None
    return None


def _data_uri(tensor: torch.Tensor) -> str:
    buffer = io.BytesIO()
    TF.to_pil_image(tensor).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _similarity_table(sims: torch.Tensor, captions: list[str]) -> str:
    """sims (K views, 1 + C captions) -> an HTML table, cells shaded by value."""
    head = "".join(f"<th>view {k}</th>" for k in range(sims.shape[0]))
    rows = []
    for c, caption in enumerate(captions):
        cells = "".join(
            f'<td style="background:rgba(40,120,220,{max(0.0, float(v)):.2f})">{float(v):.2f}</td>' for v in sims[:, c])
        label = "real" if c == 0 else f"syn {c}"
        rows.append(f"<tr><th title='{html.escape(caption)}'>{label}</th>{cells}</tr>")
    return f"<table class='sim'><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def write_inspection_html(path: str | Path, out: str | Path, images: str | Path | None = None,
                          num_samples: int = 12) -> Path:
    """A self-contained page (images inlined) of `num_samples` samples; see the module docstring."""
    info = read_info(path)
    sections = []
    for n, sample in enumerate(open_reinforced(path, images)):
        if n >= num_samples:
            break
        teachers = _teacher_dims(info, int(sample["image_emb"].shape[1]))
        captions = [sample["caption"] or "(no caption)"] + list(sample["syn_captions"])
        if sample["image"] is not None and sample["param_aug"]:
            try:
                views = [replay_augmentation(sample["image"], p, info.augmentation) for p in sample["param_aug"]]
                strip = "".join(f"<figure><img src='{_data_uri(v)}'><figcaption>{k}</figcaption></figure>"
                                for k, v in enumerate(views))
            except ValueError as e:  # stored parameters that do not fit this image
                strip = f"<p>(the stored augmentations cannot be replayed: {html.escape(str(e))})</p>"
        else:
            strip = "<p>(no source image: pass --images to join them by key)</p>"
        tables, start = [], 0
        for t in teachers:
            image_emb = sample["image_emb"][:, start:start + t["dim"]]  # (K, D_t)
            text_emb = sample["text_emb"][:, start:start + t["dim"]]  # (1 + C, D_t)
            tables.append(f"<h4>{html.escape(str(t['spec']))}</h4>" + _similarity_table(image_emb @ text_emb.T,
                                                                                          captions))
            start += t["dim"]
        caption_list = "".join(f"<li>{'<b>real</b>: ' if i == 0 else ''}{html.escape(c)}</li>"
                               for i, c in enumerate(captions))
        sections.append(f"<section><h3>{html.escape(sample['key'])}</h3><div class='views'>{strip}</div>"
                        f"<ol start='0'>{caption_list}</ol>{''.join(tables)}</section>")
    style = ("body{font-family:sans-serif;margin:2em}section{border-top:1px solid #ccc;padding:1em 0}"
             ".views{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;text-align:center;font-size:11px}"
             "img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ddd}"
             "table.sim{border-collapse:collapse;font-size:11px;margin:4px 0}"
             "table.sim td,table.sim th{border:1px solid #ddd;padding:2px 5px}")
    summary = html.escape(f"{info.format} dataset, teachers: {', '.join(str(t['spec']) for t in info.teachers)}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>reinforced dataset</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(str(path))}</h1><p>{summary}</p>"
            f"<p>Each row of views replays the stored augmentation parameters on the source image, exactly what the "
            f"teachers were shown. Tables: cosine similarity of each caption (rows) to each view (columns).</p>"
            f"{''.join(sections)}</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
