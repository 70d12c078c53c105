"""Captioners: open_clip CoCa models that write synthetic captions with seeded top-p sampling.

Each caption draws its random numbers from its own generator, seeded from (sample seed, caption index), so a
sample's captions are the same whatever batch it is generated in (MobileCLIP's reinforced datasets must be
reproducible across batch sizes and processes).
"""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import open_clip
import PIL.Image
import torch
from torch import nn

from mdcore.errors import UserInputError
from teachers.coca_decoding import CachedCoCa
from teachers.specs import LoadedModel, ModelSpec, load_model

__all__ = ["Captioner", "load_captioner"]

_SOT_DEFAULT, _EOT_DEFAULT = 49406, 49407
GROUP = 8  # images per decoding forward pass (with their captions)


class Captioner(nn.Module):
    """A frozen CoCa model that generates captions."""

    def __init__(self, loaded: LoadedModel):
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
        (`teachers.coca_decoding`), each image encoded once for all its captions.

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
        # and several sharing the cores: each group is decoded on one thread, groups in parallel.
        workers = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                return [c for group in pool.map(caption_group, starts) for c in group]
        finally:
            torch.set_num_threads(workers)

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
        decoder = CachedCoCa(model)
        state = decoder.start(image_embs, rows_per_image, max_len)
        n = len(pixels) * rows_per_image
        device = pixels.device
        pad = model.pad_id
        tokens = torch.full((n, 1), self.sot_id, dtype=torch.long, device=device)  # (N, 1)
        done = torch.zeros(n, dtype=torch.bool, device=device) if padding is None else padding.clone()
        for position in range(max_len - 1):
            logits = decoder.step(state, tokens[:, -1], position)  # (N, V)
            length = position + 1  # tokens so far, the start token included
            if length < min_len:
                logits[:, self.eot_id] = float("-inf")
            if length + 1 == max_len:  # the last position can only end the caption
                next_token = torch.full((n,), self.eot_id, dtype=torch.long, device=device)
            elif top_p <= 0:
                next_token = logits.argmax(dim=-1)
            else:
                next_token = _sample_top_p(logits / temperature, top_p, generators)
            next_token = torch.where(done, torch.full_like(next_token, pad), next_token)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            done |= (next_token == self.eot_id) | (next_token == pad)
            if bool(done.all()):
                break
        return tokens

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


def _sample_top_p(logits: torch.Tensor, top_p: float, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by nucleus sampling; row i uses only `generators[i]`. logits: (N, V) -> (N,)

    The distribution is built in float64 with a stable sort from logits snapped to a 1/1024 grid, so that ties
    and last-bit differences in the logits (another thread count, say) rarely change the token.
    """
    logits = torch.round(logits.double() * 1024) / 1024
    probs = torch.softmax(logits, dim=-1)  # (N, V) float64
    tokens = []
    for row, generator in zip(probs, generators):  # row by row: each sorts only as far as its own nucleus
        sorted_probs, order = _sorted_nucleus(row[None], top_p)  # (1, K) with K <= V
        keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p  # the top token is always kept
        cdf = (sorted_probs * keep).cumsum(dim=-1)  # (1, K)
        u = torch.rand((), generator=generator).to(cdf) * cdf[:, -1]  # (1,)
        choice = torch.searchsorted(cdf, u[:, None]).clamp_(max=cdf.shape[-1] - 1)  # (1, 1)
        tokens.append(order[0, choice[0, 0]])
    return torch.stack(tokens)


def _sorted_nucleus(probs: torch.Tensor, top_p: float, candidates: tuple[int, ...] = (64, 2048)
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted descending (ties by token id) with their token ids, far enough to cover the nucleus.

    Sorting a whole vocabulary at every step is most of the sampler's cost, and the nucleus usually holds a few
    tokens. So the k most probable are sorted (k from `candidates`, growing), and the full sort is used only when
    their mass stays under `top_p` or the nucleus reaches their smallest probability (where a tie could hide a
    token outside them): the same tokens, in the same order, as sorting everything.
    """
    for k in candidates:
        if k >= probs.shape[-1]:
            break
        values, ids = probs.topk(k, dim=-1)  # (N, k) descending; ties in no particular order
        order = ids.argsort(dim=-1)  # by id, then stably by probability: the order of a stable full sort
        values, ids = values.gather(1, order), ids.gather(1, order)
        order = values.argsort(dim=-1, descending=True, stable=True)
        values, ids = values.gather(1, order), ids.gather(1, order)
        needed = (values.cumsum(dim=-1) - values) < top_p  # the candidates the nucleus takes
        if bool((values.sum(dim=-1) >= top_p).all()) and not bool((needed & (values <= values[:, -1:])).any()):
            return values, ids
    return probs.sort(dim=-1, descending=True, stable=True)


def load_captioner(spec: str | ModelSpec, device: str | torch.device = "cpu") -> Captioner:
    return Captioner(load_model(spec, device=device))
