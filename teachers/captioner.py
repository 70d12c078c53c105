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
        min_len: int = 3,
    ) -> list[list[str]]:
        """`num_captions` captions for each image; image i's captions depend only on it and `seeds[i]`.

        `images` are PIL images (this captioner's preprocessing is applied) or an already preprocessed batch.
        Nucleus sampling (Holtzman et al., 2020): at each step keep the smallest set of tokens whose probability
        reaches `top_p`, renormalize, and sample with the caption's own generator.

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
            generators, rows = [], []
            for i in range(start, start + GROUP):
                for j in range(num_captions):
                    g = torch.Generator()
                    g.manual_seed((int(seeds[i]) * 1_000_003 + j) % (2**63) if i in members else 0)
                    generators.append(g)
                    rows.append(i if i in members else None)
            blank = torch.zeros_like(pixels[0])
            batch = torch.stack([pixels[i] if i is not None else blank for i in rows]).to(device)  # (G*C, 3, H, W)
            padding = torch.tensor([i is None for i in rows], device=device)
            tokens = self._decode_batch(batch, generators, top_p, temperature, max_len, min_len, padding).tolist()
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

    def _decode_batch(self, pixels: torch.Tensor, generators: list[torch.Generator], top_p: float,
                      temperature: float, max_len: int, min_len: int, padding: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Token ids (N, L) sampled for N image rows, row i drawing from generators[i]; `padding` rows (N,) bool
        are computed (the shape stays fixed) but not waited for."""
        device = pixels.device
        _, image_embs = self.model._encode_image(pixels)
        tokens = torch.full((len(pixels), 1), self.sot_id, dtype=torch.long, device=device)  # (N, 1)
        done = torch.zeros(len(pixels), dtype=torch.bool, device=device) if padding is None else padding.clone()
        for step in range(max_len - 1):
            logits = self._next_token_logits(image_embs, tokens)  # (N, V)
            if step < min_len:
                logits[:, self.eot_id] = float("-inf")
            logits[:, self.sot_id] = float("-inf")
            if step == max_len - 2:  # the last position can only end the caption
                next_token = torch.full((len(pixels),), self.eot_id, dtype=torch.long, device=device)
            else:
                next_token = _sample_top_p(logits / temperature, top_p, generators)
            next_token = torch.where(done, torch.zeros_like(next_token), next_token)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            done |= next_token == self.eot_id
            if bool(done.all()):
                break
        return tokens

    def _next_token_logits(self, image_embs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) of the token after `tokens` (N, L): CoCa's decoder, projected onto the vocabulary at the
        last position only (open_clip's forward projects every position, L times the work on a large vocabulary)."""
        decoder = self.model.text_decoder
        _, x = self.model._encode_text(tokens)  # (N, L, W) token embeddings of the unimodal text tower
        length = x.shape[1]
        if not decoder.batch_first:
            image_embs, x = image_embs.permute(1, 0, 2), x.permute(1, 0, 2)
        for block, cross_attn in zip(decoder.resblocks, decoder.cross_attn):
            x = block(x, attn_mask=decoder.attn_mask[:length, :length])
            x = cross_attn(x, k_x=image_embs, v_x=image_embs)
        last = x[:, -1] if decoder.batch_first else x[-1]  # (N, W)
        last = decoder.ln_final(last)
        if decoder.text_projection is not None:
            last = last @ decoder.text_projection
        return last.float()

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
