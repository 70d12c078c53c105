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

from distill.errors import UserInputError
from teachers.specs import LoadedModel, ModelSpec, load_model

__all__ = ["Captioner", "load_captioner"]

_SOT_DEFAULT, _EOT_DEFAULT = 49406, 49407


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

        Each image is decoded in its own forward passes (its captions form the batch). CPU and GPU matrix kernels
        pick their blocking from the batch shape (and on a CPU their reductions from the thread count), so the same
        row computed in another batch or process differs in its last bits, and a sampler turns such differences
        into other tokens. One image per forward pass, on one CPU thread, keeps every kernel, and so every caption,
        the same whatever batch or process the image comes in. On a CPU it is no slower: images are decoded in
        parallel threads (open_clip's CoCa re-runs the decoder over the whole prefix at every step anyway).
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

        def caption(image: torch.Tensor, seed: int) -> list[str]:
            generators = []
            for j in range(num_captions):
                g = torch.Generator()
                g.manual_seed((int(seed) * 1_000_003 + j) % (2**63))
                generators.append(g)
            batch = image.to(device)[None].expand(num_captions, -1, -1, -1)  # (C, 3, H, W)
            tokens = self._decode_batch(batch, generators, top_p, temperature, max_len, min_len)
            return [self._decode(row) for row in tokens.tolist()]

        if device.type != "cpu":
            return [caption(image, seed) for image, seed in zip(pixels, seeds)]
        # On a CPU, kernels also split their sums by the intra-op thread count, which differs between one process
        # and several sharing the cores: each image is decoded on one thread, images in parallel.
        workers = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                return list(pool.map(caption, pixels, seeds))
        finally:
            torch.set_num_threads(workers)

    def _decode_batch(self, pixels: torch.Tensor, generators: list[torch.Generator], top_p: float,
                      temperature: float, max_len: int, min_len: int) -> torch.Tensor:
        """Token ids (N, L) sampled for N image rows, row i drawing from generators[i]."""
        device = pixels.device
        image_latent, image_embs = self.model._encode_image(pixels)
        tokens = torch.full((len(pixels), 1), self.sot_id, dtype=torch.long, device=device)  # (N, 1)
        done = torch.zeros(len(pixels), dtype=torch.bool, device=device)
        for step in range(max_len - 1):
            logits = self.model(pixels, tokens, image_latent=image_latent, image_embs=image_embs,
                                output_labels=False)["logits"][:, -1].float()  # (N, V)
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
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (N, V)
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p  # the top token is always kept
    sorted_probs = sorted_probs * keep
    cdf = sorted_probs.cumsum(dim=-1)  # (N, V)
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(cdf) * cdf[:, -1]  # (N,)
    choice = torch.searchsorted(cdf, u[:, None]).clamp_(max=cdf.shape[-1] - 1)  # (N, 1)
    return order.gather(1, choice).squeeze(1)


def load_captioner(spec: str | ModelSpec, device: str | torch.device = "cpu") -> Captioner:
    return Captioner(load_model(spec, device=device))
