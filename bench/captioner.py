"""Captioning speed: the key-value-cached decoder, eager and torch.compile'd, against open_clip's own uncached
`CoCa.generate`, one run.

    python bench/captioner.py [--repeats 3] [--batch-sizes 1,16] [--no-generate]

Same model (random weights), same images, 24-token captions (min_seq_len 23, so every caption is 24 tokens long and
both decoders do the same work), greedy decoding (all give the same tokens), batch 1 and batch 16, for md-coca-tiny
and coca_ViT-B-32. Tokens/s counts generated tokens (23 per caption) over the best of --repeats timed calls, after a
warm-up call; the first compiled call, which compiles the step, is timed on its own. Goal: cached over uncached at
least 5x (10x hoped for) everywhere.

At batch 1 a cached step reads every decoder weight once for one token, so it cannot take less than the time to
stream those bytes: `floor` is that time at the rate this machine streams a tensor of the same size (summed again
and again, so weights that fit in the cache are read from it, as the step reads them), and `uncached / floor` the
most any cached decoder can gain over open_clip's per token at batch 1 on this machine. Every decoder also encodes
the images once per call, which the tokens/s include; `image encoding ms` times that alone, `compiled / uncached,
encoding taken out` is the compiled ratio with it taken out of both calls, and `whole-call bound` the most any
cached decoder can gain on a whole batch-1 call: open_clip's call over the encoding plus one floor per token.

Also timed: `Captioner.generate`, the public entry point (groups of 8 images decoded in parallel threads at a fixed
shape, for captions that do not depend on the batch), at batch 16 with 5 sampled captions per image.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from mdmodels.specs import load_model  # noqa: E402
from teachers.captioner import Captioner  # noqa: E402

SEQ_LEN, MIN_SEQ_LEN = 24, 23


def open_clip_generate():
    """open_clip 3.3's `generate`, given back the logits processors it disables under transformers 5 (which
    removed BeamSearchScorer); open_clip itself is not changed."""
    import open_clip.coca_model as coca
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    if not coca._has_transformers:
        coca._has_transformers = True
        coca.GENERATION_TYPES = {"top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper, "beam_search": "beam_search"}
    return lambda model, pixels: model.generate(pixels, generation_type="top_k", top_k=1, seq_len=SEQ_LEN,
                                                min_seq_len=MIN_SEQ_LEN)


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def stream_gb_per_s(size: int = 400_000_000) -> float:
    """The rate at which this machine's intra-op threads read a float32 tensor of `size` bytes, summed again and
    again (best of 5 sums after a warm-up): memory bandwidth for a large one, the cache's for one that fits."""
    data = torch.ones(size // 4)
    return data.numel() * 4 / best_seconds(data.sum, 5) / 1e9


def bytes_per_step(model: torch.nn.Module) -> int:
    """The weights one batch-1 cached step reads: the text tower and the multimodal decoder, less what a step only
    indexes (token and position embeddings) and the cross-attention key and value projections (applied to the image
    tokens once per image)."""
    total = 0
    for tower in (model.text, model.text_decoder):
        for name, weight in tower.named_parameters():
            if name in ("token_embedding.weight", "positional_embedding"):
                continue
            total += weight.numel() * weight.element_size()
    for block in model.text_decoder.cross_attn:
        kv = block.attn.in_proj_weight[block.attn.embed_dim:]
        total -= kv.numel() * kv.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes to time")
    parser.add_argument("--no-generate", action="store_true", help="skip timing Captioner.generate")
    args = parser.parse_args()
    uncached = open_clip_generate()
    bandwidth = stream_gb_per_s()
    print(f"{torch.get_num_threads()} threads; greedy, {SEQ_LEN}-token captions; a 400 MB tensor streams at "
          f"{bandwidth:.1f} GB/s\n")
    print("| model | batch | uncached (open_clip) tokens/s | cached tokens/s | compiled tokens/s | cached / uncached "
          "| compiled / uncached | floor ms/token | uncached / floor | same tokens | first compiled call s "
          "| image encoding ms | compiled / uncached, encoding taken out | whole-call bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    public, notes = {}, []  # notes are printed below the table, which they would break
    for arch in ("md-coca-tiny", "coca_ViT-B-32"):
        torch.manual_seed(0)
        captioner = Captioner(load_model(arch, warn_random=False))
        size = captioner.preprocess.transforms[0].size
        size = size[0] if isinstance(size, (list, tuple)) else size
        step_bytes = bytes_per_step(captioner.model)
        step_rate = stream_gb_per_s(step_bytes)
        floor = step_bytes / step_rate / 1e9  # seconds per batch-1 step
        notes.append(f"{arch}: a batch-1 step reads {step_bytes / 1e6:.0f} MB of weights; a tensor that size "
                     f"streams at {step_rate:.1f} GB/s")

        def ours(pixels, compiled: bool, c=captioner):
            c.compile_step = compiled
            return c.decode(pixels, 1, None, 0.0, 1.0, SEQ_LEN, MIN_SEQ_LEN)

        for batch in (int(b) for b in args.batch_sizes.split(",")):
            pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            theirs = uncached(captioner.model, pixels)
            start = time.perf_counter()
            first = ours(pixels, True)  # compiles the step for this shape
            compile_s = time.perf_counter() - start
            same = torch.equal(ours(pixels, False), theirs) and torch.equal(first, theirs)
            tokens = batch * (SEQ_LEN - 1)
            slow = best_seconds(lambda p=pixels, c=captioner: uncached(c.model, p), args.repeats)
            fast = best_seconds(lambda p=pixels: ours(p, False), args.repeats)
            compiled = best_seconds(lambda p=pixels: ours(p, True), args.repeats)
            with torch.no_grad():  # the image tower's share, the same in every decoder
                encode = best_seconds(lambda p=pixels, c=captioner: c.model._encode_image(p), args.repeats)
            bound = f"{floor * 1e3:.2f} | {slow / (SEQ_LEN - 1) / floor:.1f}x" if batch == 1 else "- | -"
            whole = f"{slow / (encode + (SEQ_LEN - 1) * floor):.1f}x" if batch == 1 else "-"
            print(f"| {arch} | {batch} | {tokens / slow:.0f} | {tokens / fast:.0f} | {tokens / compiled:.0f} | "
                  f"{slow / fast:.1f}x | {slow / compiled:.1f}x | {bound} | {same} | {compile_s:.0f} | "
                  f"{encode * 1e3:.1f} | {(slow - encode) / (compiled - encode):.1f}x | {whole} |", flush=True)
        if args.no_generate:
            continue
        images = [torch.rand(3, size, size) for _ in range(16)]
        pixels = torch.stack(images)
        for compiled in (False, True):
            captioner.compile_step = compiled
            seconds = best_seconds(lambda p=pixels, c=captioner: c.generate(p, 5, list(range(16)), top_p=0.9,
                                                                             max_len=SEQ_LEN, min_len=MIN_SEQ_LEN),
                                   args.repeats)
            public[arch, compiled] = 16 * 5 * (SEQ_LEN - 1) / seconds
    print()
    for note in notes:
        print(note)
    for (arch, compiled), rate in public.items():
        print(f"`Captioner.generate`{' compiled' if compiled else ''}, {arch}, 16 images x 5 sampled captions: "
              f"{rate:.0f} tokens/s")


if __name__ == "__main__":
    main()
