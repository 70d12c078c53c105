"""Reinforcement throughput and storage, measured in one run on one machine.

    python bench/reinforce.py --out runs/bench-reinforce [--limit 600 --num-augs 10 --num-captions 5]

1. Throughput: a whole `reinforce` run without captioner (decode, augment, encode with every teacher, write) against
   the same teachers' bare forward passes over the same number of views and captions as ready tensors at the same
   batch size. Goal: at most 1.15x. Then the same run with a captioner (md-coca-tiny, C captions), whose share of the
   time is reported apart (goal: the captioned run at most 2.0x the plain one), and `reinforce --add-to` adding the
   same captioner to the plain dataset, against the captioned run, with where its time goes.
2. Storage: bytes per sample for fp32, fp16, bf16 and int8 at K views and C captions with two teachers, with and
   without the images.
Teachers are md-teacher-s and md-teacher-m with random weights (the cost of a forward pass does not depend on them).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from mdmodels import load_model, save_model_dir
from reinforced_data.augment import AugmentationConfig
from reinforced_data.emoji import build_emoji_dataset
from teachers import load_ensemble
from teachers.extend import extend_reinforced
from teachers.reinforce import ReinforceConfig, reinforce


def _save_random(arch: str, out: Path) -> str:
    torch.manual_seed(0)
    loaded = load_model(arch, warn_random=False)
    save_model_dir(loaded.model, loaded.model_cfg, out, tokenizer=loaded.tokenizer)
    return str(out)


def _bare_forward_seconds(teacher_specs: list[str], num_samples: int, num_augs: int, num_texts: int,
                          batch_size: int, size: int) -> float:
    """Teachers' forward passes alone over ready tensors: the floor a reinforce run is compared with."""
    ensemble = load_ensemble(teacher_specs)
    samples_per_batch = max(1, batch_size // num_augs)
    images = torch.rand(samples_per_batch * num_augs, 3, size, size)
    texts = ["an emoji of a grinning face with big eyes."] * (samples_per_batch * num_texts)
    start = time.perf_counter()
    for first in range(0, num_samples, samples_per_batch):
        n = min(samples_per_batch, num_samples - first)
        ensemble.encode_image_tensors(images[: n * num_augs])
        ensemble.encode_texts(texts[: n * num_texts])
    return time.perf_counter() - start


def _caption_and_text_seconds(data: str, captioner_dir: str, teachers: list[str], num_captions: int,
                              per_batch: int) -> tuple[float, float]:
    """The captioner alone over the images (C captions each), and the teachers alone embedding those captions."""
    from reinforced_data.shards import iter_image_text, resolve_shards
    from teachers import load_captioner

    captioner, ensemble = load_captioner(captioner_dir), load_ensemble(teachers)
    images = [s.image for s in iter_image_text(resolve_shards(data, "train"))]
    start, captions = time.perf_counter(), []
    for first in range(0, len(images), per_batch):
        batch = images[first:first + per_batch]
        captions += [c for row in captioner.generate(batch, num_captions, list(range(len(batch)))) for c in row]
    caption_s = time.perf_counter() - start
    start = time.perf_counter()
    for first in range(0, len(captions), per_batch * num_captions):
        ensemble.encode_texts(captions[first:first + per_batch * num_captions])
    return caption_s, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-reinforce")
    parser.add_argument("--limit", type=int, default=600, help="emoji in the input (a subset of the full set)")
    parser.add_argument("--num-augs", type=int, default=10)
    parser.add_argument("--num-captions", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--storage-limit", type=int, default=60, help="emoji in the storage runs")
    parser.add_argument("--no-storage", action="store_true", help="measure throughput only")
    parser.add_argument("--no-throughput", action="store_true", help="measure storage only")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if not args.no_throughput:
        build_emoji_dataset(out / "emoji", limit=args.limit, progress=False)
    build_emoji_dataset(out / "emoji-small", limit=args.storage_limit, progress=False)
    teachers = [_save_random("md-teacher-s", out / "teacher-s"), _save_random("md-teacher-m", out / "teacher-m")]
    captioner = _save_random("md-coca-tiny", out / "captioner")
    augmentation = AugmentationConfig(size=64, scale=(0.35, 1.0))

    def run(name: str, data: str = "emoji", **overrides) -> tuple[dict, float]:
        config = ReinforceConfig(**{"num_augs": args.num_augs, "num_captions": 0, "dtype": "fp16",
                                    "batch_size": args.batch_size, "augmentation": augmentation, **overrides})
        captioners = [captioner] if config.num_captions else []
        start = time.perf_counter()
        result = reinforce(str(out / data), teachers, out / name, config, captioners=captioners, progress=False)
        return result, time.perf_counter() - start

    results: dict = {}
    if not args.no_throughput:
        plain, plain_s = run("plain")
        n = plain["counts"]["samples"]
        bare_s = _bare_forward_seconds(teachers, n, args.num_augs, 1, args.batch_size, 64)
        captioned, captioned_s = run("captioned", num_captions=args.num_captions)
        print(f"\n{n} samples, K={args.num_augs}, teachers md-teacher-s + md-teacher-m, "
              f"batch {args.batch_size} views\n")
        # `wall_s` in config.json counts from after the models are loaded (a one-time cost, a few seconds).
        plain_work, captioned_work = plain["wall_s"], captioned["wall_s"]
        print("| run | wall, whole call (s) | wall after model load (s) | samples/s | "
              "ratio to bare forward (after load) |")
        print("|---|---|---|---|---|")
        print(f"| bare teacher forward passes (ready tensors) | {bare_s:.1f} | {bare_s:.1f} | {n / bare_s:.1f} | "
              "1.00 |")
        print(f"| `reinforce`, no captioner | {plain_s:.1f} | {plain_work:.1f} | {n / plain_work:.1f} | "
              f"{plain_work / bare_s:.2f} |")
        print(f"| `reinforce`, md-coca-tiny, C={args.num_captions} | {captioned_s:.1f} | {captioned_work:.1f} | "
              f"{n / captioned_work:.1f} | {captioned_work / bare_s:.2f} |")
        print(f"\ncaptioner share of the captioned run: "
              f"{100 * (captioned_work - plain_work) / captioned_work:.0f}%; captioned over plain: "
              f"{captioned_work / plain_work:.2f}x (goal <= 2.0)\n")
        # --add-to: the same captioner added to the finished plain dataset, against the captioned run
        shutil.copytree(out / "plain", out / "added")
        start = time.perf_counter()
        extended = extend_reinforced(out / "added", captioner=f"{captioner}:coca", num_captions=args.num_captions,
                                     batch_size=max(1, args.batch_size // args.num_augs), progress=False)
        added_s = time.perf_counter() - start
        caption_s, text_s = _caption_and_text_seconds(str(out / "emoji"), captioner, teachers, args.num_captions,
                                                      max(1, args.batch_size // args.num_augs))
        print(f"`reinforce --add-to` with md-coca-tiny, C={args.num_captions}: {added_s:.1f} s whole call "
              f"({extended['extensions'][-1]['wall_s']:.1f} s after model load), {added_s / captioned_s:.2f}x the "
              f"captioned run's whole call. Timed alone over the same images: captioner {caption_s:.1f} s, teachers "
              f"embedding the captions {text_s:.1f} s, together "
              f"{100 * (caption_s + text_s) / extended['extensions'][-1]['wall_s']:.0f}% of the call (reading, "
              "decoding and rewriting the shards run beside them)\n")
        results.update(samples=n, bare_s=bare_s, plain_s=plain_work, captioned_s=captioned_work,
                       captioned_over_plain=captioned_work / plain_work, add_to_s=added_s,
                       add_to_over_captioned=added_s / captioned_s, add_to_captioner_s=caption_s,
                       add_to_text_s=text_s)

    if args.no_storage:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        return
    print("| dtype | bytes/sample with images | bytes/sample embeddings only | vs fp32 (embeddings only) |")
    print("|---|---|---|---|")
    sizes = {}
    for dtype in ("fp32", "fp16", "bf16", "int8"):
        with_images, _ = run(f"{dtype}-images", "emoji-small", dtype=dtype, num_captions=args.num_captions)
        only, _ = run(f"{dtype}-embeddings", "emoji-small", dtype=dtype, num_captions=args.num_captions,
                      store_images=False)
        sizes[dtype] = (with_images["counts"]["bytes_per_sample"], only["counts"]["bytes_per_sample"])
    for dtype, (with_images, only) in sizes.items():
        print(f"| {dtype} | {with_images:.0f} | {only:.0f} | {only / sizes['fp32'][1]:.3f} |")
    results["bytes_per_sample"] = sizes

    # The same samples (same metadata, captions, augmentation parameters) with embeddings as wide as two
    # ViT-L-14 teachers (D = 768 + 768, DataCompDR's): only the npz member changes size.
    wide = _rewrite_wide(out / "fp32-embeddings", out / "wide", [768, 768])
    print("\nsame samples, embeddings only, teachers D = 768 + 768:\n")
    print("| dtype | bytes/sample | vs fp32 |")
    print("|---|---|---|")
    for dtype, size in wide.items():
        print(f"| {dtype} | {size:.0f} | {size / wide['fp32']:.3f} |")
    results["bytes_per_sample_d1536"] = wide
    (out / "results.json").write_text(json.dumps(results, indent=2))


def _rewrite_wide(source: Path, out: Path, dims: list[int]) -> dict[str, float]:
    import numpy as np

    from reinforced_data.shards import iter_raw_samples, open_tar_writer
    from reinforced_data.storage import decode_embedding_arrays, encode_embeddings

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = {}
    raws = list(iter_raw_samples(sorted(str(p) for p in source.glob("*.tar"))))
    for dtype in ("fp32", "fp16", "bf16", "int8"):
        path = out / f"{dtype}.tar"
        with open_tar_writer(path) as sink:
            for raw in raws:
                arrays = decode_embedding_arrays("npz", raw["npz"])

                def widen(rows: int) -> np.ndarray:
                    parts = [rng.standard_normal((rows, d)).astype(np.float32) for d in dims]
                    return np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts], axis=1)

                extra = {k: widen(len(v)) for k, v in arrays.items() if k not in ("image_emb", "text_emb")}
                ext, blob = encode_embeddings(widen(len(arrays["image_emb"])), widen(len(arrays["text_emb"])), dtype,
                                              dims, extra)
                record = {k: v for k, v in raw.items() if not k.startswith("__") and k != "npz"}
                sink.write({"__key__": raw["__key__"], **record, ext: blob})
        sizes[dtype] = path.stat().st_size / len(raws)
    return sizes


if __name__ == "__main__":
    main()
