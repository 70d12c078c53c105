"""Captioners: open_clip CoCa models that write synthetic captions with seeded top-p sampling.

Each caption draws its random numbers from its own generator, seeded from (sample seed, caption index), so a
sample's captions are the same whatever batch it is generated in (MobileCLIP's reinforced datasets must be
reproducible across batch sizes and processes).
"""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import open_clip
import PIL.Image
import torch
from torch import nn

from mdcore.errors import UserInputError
from mdcore.threads import torch_threads
from mdmodels.specs import LoadedModel, ModelSpec, load_model
from teachers.coca_decoding import CachedCoCa

__all__ = ["Captioner", "load_captioner"]

_SOT_DEFAULT, _EOT_DEFAULT = 49406, 49407
GROUP = 8  # images per decoding forward pass (with their captions)


class Captioner(nn.Module):
    """A frozen CoCa model that generates captions."""

    def __init__(self, loaded: LoadedModel, compile_step: bool = False):
        super().__init__()
        if not loaded.is_coca:
            raise UserInputError(f"{loaded.spec} is not a captioner: expected an open_clip CoCa model")
        self.model = loaded.model
        self.model.requires_grad_(False)
        self.preprocess = loaded.preprocess
        self.tokenizer = loaded.tokenizer
        self.spec: ModelSpec = loaded.spec
        self.sot_id = getattr(self.tokenizer, "sot_token_id", _SOT_DEFAULT)
        self.eot_id = getattr(self.tokenizer, "eot_token_id", _EOT_DEFAULT)
        self.decoder = CachedCoCa(self.model)
        self.compile_step = compile_step  # decode with the torch.compile'd fixed-shape step (CachedCoCa.compiled)
        self._compiled_shapes: set[tuple] = set()  # (rows, max_len, dtype) the one-thread step was compiled for
        super().train(False)

    def train(self, mode: bool = True) -> "Captioner":
        return super().train(False)

    def state_dict(self, *args, **kwargs):
        return {}

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[PIL.Image.Image] | torch.Tensor,
        num_captions: int,
        seeds: Sequence[int],
        top_p: float = 0.9,
        temperature: float = 1.0,
        max_len: int = 24,
        min_len: int = 5,
    ) -> list[list[str]]:
        """`num_captions` captions for each image; image i's captions depend only on it and `seeds[i]`.

        `images` are PIL images (this captioner's preprocessing is applied) or an already preprocessed batch.
        Nucleus sampling (Holtzman et al., 2020): at each step keep the smallest set of tokens whose probability
        reaches `top_p`, renormalize, and sample with the caption's own generator; `top_p=0` decodes greedily.
        `max_len` and `min_len` count tokens as open_clip's `generate` counts `seq_len` and `min_seq_len` (start
        and end tokens included; the end token is refused before `min_len`), and greedy decoding gives the tokens
        of open_clip's `generate(generation_type="top_k", top_k=1)`. Decoding is key-value cached
        (`teachers.coca_decoding`), each image encoded once for all its captions; with `compile_step` the step is
        torch.compile'd, whose kernels round differently, so sampled captions are then those of the compiled
        decoder (still independent of the batch and the processes).

        Images are decoded in groups of `GROUP` images (their captions form one batch), the last group padded with
        blank rows, so every forward pass has the same shape. CPU and GPU matrix kernels pick their blocking from
        the batch shape (and on a CPU their reductions from the thread count), so the same row computed in a batch
        of another shape, or on another number of threads, differs in its last bits, and a sampler turns such
        differences into other tokens. Fixed shapes on one CPU thread per group keep every kernel, and so every
        caption, the same whatever batch or process the image comes in (tests compare batch 3 with 64, and one
        process with two). Groups are decoded in parallel threads.
        """
        if num_captions <= 0:
            return [[] for _ in range(len(seeds))]
        if isinstance(images, torch.Tensor):
            pixels = images
        else:
            pixels = torch.stack([self.preprocess(im) for im in images])
        if len(pixels) != len(seeds):
            raise ValueError(f"{len(pixels)} images but {len(seeds)} seeds")
        device = next(self.model.parameters()).device
        max_len = min(max_len, self.model.text.context_length)

        def caption_group(start: int) -> list[list[str]]:
            members = range(start, min(start + GROUP, len(pixels)))
            generators, padding = [], []
            for i in range(start, start + GROUP):
                for j in range(num_captions):
                    g = torch.Generator()
                    g.manual_seed((int(seeds[i]) * 1_000_003 + j) % (2**63) if i in members else 0)
                    generators.append(g)
                    padding.append(i not in members)
            blank = torch.zeros_like(pixels[0])
            group = torch.stack([pixels[i] if i in members else blank for i in range(start, start + GROUP)])
            tokens = self.decode(group.to(device), num_captions, generators, top_p, temperature, max_len, min_len,
                                 torch.tensor(padding, device=device)).tolist()
            return [[self._decode(tokens[k * num_captions + j]) for j in range(num_captions)]
                    for k in range(len(members))]

        starts = range(0, len(pixels), GROUP)
        if device.type != "cpu":
            return [c for start in starts for c in caption_group(start)]
        # On a CPU, kernels also split their sums by the intra-op thread count, which differs between one process
        # and several sharing the cores: each group is decoded on one thread, groups in parallel. A compiled step
        # is compiled by the first group alone, before the others run beside each other.
        with torch_threads(1) as workers, ThreadPoolExecutor(workers) as pool:
            shape = (GROUP * num_captions, max_len, pixels.dtype)
            first = caption_group(0) if self.compile_step and starts and shape not in self._compiled_shapes else []
            if self.compile_step:
                self._compiled_shapes.add(shape)
            return first + [c for group in pool.map(caption_group, starts[1 if first else 0:]) for c in group]

    @torch.no_grad()
    def decode(self, pixels: torch.Tensor, rows_per_image: int, generators: list[torch.Generator] | None,
               top_p: float, temperature: float, max_len: int, min_len: int,
               padding: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (G * rows_per_image, L <= max_len) for G preprocessed images (G, 3, H, W), row i drawing from
        generators[i] (none needed when greedy, `top_p=0`); `padding` rows (N,) bool are computed (the shape stays
        fixed) but end at once. Rows end as open_clip's `generate` ends them: at the end token, or when they emit
        the pad id, which is then repeated."""
        model = self.model
        _, image_embs = model._encode_image(pixels)  # (G, T, W): each image once, for all its rows
        decoder = self.decoder
        state = decoder.start(image_embs, rows_per_image, max_len)
        step = decoder.compiled(pixels.device) if self.compile_step else decoder.step
        n = len(pixels) * rows_per_image
        device = pixels.device
        pad = model.pad_id
        last = torch.full((n,), self.sot_id, dtype=torch.long, device=device)  # (N,) the token fed next
        tokens = [last]
        done = torch.zeros(n, dtype=torch.bool, device=device) if padding is None else padding.clone()
        for position in range(max_len - 1):
            at = torch.tensor([position], device=device) if self.compile_step else position
            try:
                logits = step(state, last, at)  # (N, V)
            except torch._dynamo.exc.BackendCompilerFailed as error:  # no C++ compiler or Triton, say
                cause = str(error.inner_exception).strip().splitlines() or [type(error.inner_exception).__name__]
                raise UserInputError(f"torch.compile could not build the captioner's decoding step ({cause[0][:200]});"
                                     " run without --compile") from error
            length = position + 1  # tokens so far, the start token included
            if length < min_len:
                logits[:, self.eot_id] = float("-inf")
            if length + 1 == max_len:  # the last position can only end the caption
                next_token = torch.full((n,), self.eot_id, dtype=torch.long, device=device)
            elif top_p <= 0:
                next_token = logits.max(dim=-1).indices  # argmax's first maximum; on a CPU 3x as fast as argmax
            else:
                next_token = _sample_top_p(logits / temperature, top_p, generators)
            last = torch.where(done, torch.full_like(next_token, pad), next_token)
            tokens.append(last)
            done |= (last == self.eot_id) | (last == pad)
            if bool(done.all()):
                break
        return torch.stack(tokens, dim=1)

    def _decode(self, ids: list[int]) -> str:
        ids = ids[1:]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        ids = [i for i in ids if i != 0]
        if isinstance(self.tokenizer, open_clip.SimpleTokenizer):
            text = self.tokenizer.decode(ids)
        else:
            text = self.tokenizer.tokenizer.decode(ids, skip_special_tokens=True)
        return " ".join(text.replace("<start_of_text>", " ").replace("<end_of_text>", " ").split())


@dataclass
class Nucleus:
    """The nucleus of each row of snapped logits, as buckets of equal logits (so of equal probability), counted
    from the row's best: buckets 0 .. cutoff - 1 are in whole, and of bucket `cutoff` its first `partial` tokens
    in id order."""

    depth: torch.Tensor  # (N, V) long: each token's bucket
    mass: torch.Tensor  # (N, buckets) float64: probability of each bucket
    count: torch.Tensor  # (N, buckets) long: tokens in each bucket
    cutoff: torch.Tensor  # (N,) long
    partial: torch.Tensor  # (N,) long, >= 1

    def mask(self) -> torch.Tensor:
        """(N, V) bool: the tokens in the nucleus."""
        at = self.depth == self.cutoff[:, None]
        return (self.depth < self.cutoff[:, None]) | at & (at.cumsum(dim=1) <= self.partial[:, None])


def nucleus(logits: torch.Tensor, top_p: float) -> Nucleus:
    """The nucleus (Holtzman et al., 2020) of logits snapped to a 1/1024 grid: per row, the smallest set of most
    probable tokens whose mass reaches `top_p`, ties broken by token id.

    Found without sorting the vocabulary (a full sort per row and step was most of a sampler's cost, and random or
    barely trained captioners have nuclei of thousands of tokens): tokens are pooled by snapped logit, whose
    masses, accumulated from the top, give the bucket where `top_p` is reached; of its tokens, all equally
    probable, those with the smallest ids are taken while the mass before them stays under `top_p`. Each bucket's
    mass comes from its count (its tokens share one logit), so no softmax over the vocabulary is needed. Refused
    tokens (logit -inf) and logits more than 64 below a row's best share a last bucket of no weight (the latter
    together weigh under 1e-23, so the cutoff is never among them). Snapping makes ties exact and keeps last-bit
    differences (another thread count, say) from changing the set.
    """
    grid = torch.round(logits.float() * 1024)  # (N, V) integers; refused tokens at -inf
    gap = grid.max(dim=1, keepdim=True).values - grid  # (N, V): 0 at the best, inf where refused
    refused = torch.isinf(gap)
    far = min(64 * 1024, int(gap.masked_fill(refused, 0).max()) + 1)  # the last bucket: refused tokens, far tail
    depth = gap.clamp_(max=far).long()  # (N, V)
    count = torch.zeros(len(grid), far + 1, dtype=torch.long).scatter_add_(
        1, depth, torch.ones((), dtype=torch.long).expand_as(depth))  # (N, B) tokens per bucket
    # every token of bucket d has logit (best - d) / 1024: the softmax, one term per bucket; the last weighs 0
    weight = count * torch.exp(-torch.arange(far + 1, dtype=torch.float64) / 1024)  # (N, B)
    weight[:, far] = 0.0
    mass = weight / weight.sum(dim=1, keepdim=True)  # (N, B)
    reached = mass.cumsum(dim=1)  # (N, B): mass of the buckets up to each
    cutoff = (reached >= top_p).int().argmax(dim=1)  # (N,)
    rows = torch.arange(len(grid))
    before = reached[rows, cutoff] - mass[rows, cutoff]  # (N,) mass of the whole buckets above the cutoff
    each = mass[rows, cutoff] / count[rows, cutoff]  # (N,) probability of one token of the cutoff bucket
    partial = torch.ceil((top_p - before) / each).long().clamp_(min=1).minimum(count[rows, cutoff])
    return Nucleus(depth, mass, count, cutoff, partial)


def _sample_top_p(logits: torch.Tensor, top_p: float, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by nucleus sampling (`nucleus`); row i draws only from `generators[i]`, and each row's
    token depends on that row alone: a bucket by its mass, then one of its equally probable tokens in id order.
    logits: (N, V) -> (N,)"""
    found = nucleus(logits, top_p)
    tokens = []
    for i, generator in enumerate(generators):
        cutoff, partial = int(found.cutoff[i]), int(found.partial[i])
        mass, count = found.mass[i, :cutoff + 1].clone(), found.count[i, :cutoff + 1].clone()
        mass[cutoff] *= partial / count[cutoff]  # (cutoff + 1,): the cutoff bucket's share in the nucleus
        count[cutoff] = partial
        cumulative = mass.cumsum(dim=0)
        u = torch.rand((), generator=generator, dtype=torch.float64) * cumulative[-1]
        bucket = int(torch.searchsorted(cumulative, u[None]).clamp_(max=cutoff))
        share = (u - (cumulative[bucket] - mass[bucket])) / mass[bucket]  # where u falls within the bucket
        k = min(int(share * count[bucket]), int(count[bucket]) - 1)
        tokens.append(torch.nonzero(found.depth[i] == bucket)[k, 0])
    return torch.stack(tokens)


def load_captioner(spec: str | ModelSpec, device: str | torch.device = "cpu",
                   compile_step: bool = False) -> Captioner:
    return Captioner(load_model(spec, device=device), compile_step=compile_step)
