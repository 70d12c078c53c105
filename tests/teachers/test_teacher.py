import pytest
import torch

from mdmodels import load_model
from teachers import Captioner, Teacher, TeacherEnsemble
from tests.conftest import draw_shape


@pytest.fixture(scope="module")
def ensemble() -> TeacherEnsemble:
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        small = Teacher(load_model("md-teacher-s"))
    with pytest.warns(UserWarning):
        other = Teacher(load_model("md-student-tiny"))
    return TeacherEnsemble([small, other])


def test_ensemble_shapes_and_normalization(ensemble):
    images = [draw_shape("red", "circle", 48), draw_shape("blue", "square", 80)]
    image_emb = ensemble.encode_images(images)
    text_emb = ensemble.encode_texts(["a red circle.", "a blue square.", "a green triangle."])
    assert ensemble.dims == [128, 128]
    assert image_emb.shape == (2, 256) and text_emb.shape == (3, 256)
    for part in ensemble.split(image_emb) + ensemble.split(text_emb):
        assert torch.allclose(part.norm(dim=-1), torch.ones(len(part)), atol=1e-5)


def test_tensor_path_matches_each_teachers_own_preprocessing(ensemble):
    """Float views at a teacher's size embed as its PIL path does (resize, crop, normalize); views of another size
    are first resized to it, as torchvision's resize does."""
    import torchvision.transforms.functional as TF

    pictures = [draw_shape("red", "circle", 64), draw_shape("blue", "square", 64, offset=6)]
    views = torch.stack([TF.to_tensor(p) for p in pictures])  # (2, 3, 64, 64) in [0, 1]
    assert all(t.image_size == (64, 64) for t in ensemble.teachers)
    torch.testing.assert_close(ensemble.encode_image_tensors(views), ensemble.encode_images(pictures),
                               atol=1e-5, rtol=1e-5)
    large = torch.rand(2, 3, 96, 96)
    for teacher in ensemble.teachers:
        mode = TF.InterpolationMode(teacher.interpolation)
        resized = TF.resize(large, [64, 64], interpolation=mode, antialias=True).clamp(0, 1)
        torch.testing.assert_close(teacher.encode_image_tensors(large), teacher.encode_image_tensors(resized),
                                   atol=1e-5, rtol=1e-5)


def test_teachers_are_frozen_and_stay_in_eval_mode(ensemble):
    ensemble.train()
    for teacher in ensemble.teachers:
        assert not teacher.training and not teacher.model.training
        assert all(not p.requires_grad for p in teacher.parameters())
    assert ensemble.state_dict() == {}
    out = ensemble.encode_texts(["a red circle."])
    assert not out.requires_grad


def test_each_teacher_keeps_its_own_preprocessing(ensemble):
    a, b = ensemble.teachers
    assert a.preprocess is not b.preprocess
    assert a.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's initial temperature


def test_random_coca_is_reproducible_from_the_seed_whatever_was_allocated_before():
    # open_clip leaves the CoCa decoder's vocabulary projection as torch.empty memory; load_model draws it.
    def build():
        torch.manual_seed(0)
        return load_model("md-coca-tiny", warn_random=False).model

    first = build()
    for _ in range(3):  # churn the allocator, so uninitialized memory would hold other values
        junk = torch.randn(192 * 49408) * float("inf")
        del junk
    second = build()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
    projection = first.text_decoder.text_projection
    assert 0.5 < float(projection.std()) * 192 ** 0.5 < 1.5


def test_captioner_is_seeded_per_sample_whatever_the_batch():
    torch.manual_seed(0)
    captioner = Captioner(load_model("md-coca-tiny", warn_random=False))
    images = [draw_shape(c, "circle", 64) for c in ("red", "green", "blue")]
    together = captioner.generate(images, num_captions=2, seeds=[10, 11, 12], max_len=8)
    alone = captioner.generate(images[1:2], num_captions=2, seeds=[11], max_len=8)
    assert len(together) == 3 and all(len(c) == 2 for c in together)
    assert together[1] == alone[0], (together, alone)
    assert together[0] != together[2] or together[0][0] != together[0][1]
    assert captioner.generate(images, num_captions=2, seeds=[10, 11, 12], max_len=8) == together


def test_captioner_rejects_clip_models():
    from mdcore.errors import UserInputError

    with pytest.warns(UserWarning), pytest.raises(UserInputError, match="not a captioner"):
        Captioner(load_model("md-teacher-s"))


@pytest.fixture
def open_clip_generate():
    """open_clip's own uncached `CoCa.generate`, the reference. open_clip 3.3 imports transformers'
    BeamSearchScorer, which transformers 5 removed, and then disables generation altogether; the logits
    processors it needs for top-k decoding are there, so they are handed back to it (open_clip is not changed)."""
    import open_clip.coca_model as coca
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    patch = pytest.MonkeyPatch()
    if not coca._has_transformers:
        patch.setattr(coca, "_has_transformers", True)
        patch.setattr(coca, "GENERATION_TYPES", {"top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper,
                                                 "beam_search": "beam_search"})
    yield lambda model, pixels, **kw: model.generate(pixels, generation_type="top_k", top_k=1, **kw)
    patch.undo()


@pytest.mark.parametrize("arch", ["md-coca-tiny", "coca_ViT-B-32"])
def test_cached_greedy_decoding_gives_open_clips_tokens(arch, open_clip_generate):
    torch.manual_seed(0)
    captioner = Captioner(load_model(arch, warn_random=False))
    size = captioner.preprocess.transforms[0].size
    size = size[0] if isinstance(size, (list, tuple)) else size
    images = [draw_shape(color, shape, size) for color, shape in (("red", "circle"), ("blue", "square"),
                                                                  ("green", "triangle"))]
    pixels = torch.stack([captioner.preprocess(im) for im in images])
    for seq_len, min_seq_len in ((12, 5), (16, 15)):
        reference = open_clip_generate(captioner.model, pixels, seq_len=seq_len, min_seq_len=min_seq_len)
        ours = captioner.decode(pixels, 1, None, 0.0, 1.0, seq_len, min_seq_len)
        assert ours.shape == reference.shape and torch.equal(ours, reference), (seq_len, ours, reference)
    # several captions per image: each image's greedy rows are its own tokens, the image encoded once
    twice = captioner.decode(pixels, 2, None, 0.0, 1.0, 12, 5)
    once = captioner.decode(pixels, 1, None, 0.0, 1.0, 12, 5)
    assert torch.equal(twice[::2], once) and torch.equal(twice[1::2], once)
    assert captioner.generate(images, 1, [0, 1, 2], top_p=0, max_len=12) == [
        [captioner._decode(row)] for row in once.tolist()]


def test_cached_logits_equal_open_clips_forward_at_every_step():
    """Step by step, the cached decoder's logits are those of open_clip's full forward over the prefix (a token
    0, the pad id, in the prefix exercises CoCa's legacy text mask)."""
    from teachers.coca_decoding import CachedCoCa

    torch.manual_seed(0)
    captioner = Captioner(load_model("md-coca-tiny", warn_random=False))
    pixels = torch.stack([captioner.preprocess(draw_shape("red", "circle", 64))] * 2)
    tokens = torch.tensor([[49406, 320, 1125, 0, 539, 4341], [49406, 320, 2866, 539, 0, 0]])
    with torch.no_grad():
        image_latent, image_embs = captioner.model._encode_image(pixels)
        decoder = CachedCoCa(captioner.model)
        state = decoder.start(image_embs, 1, tokens.shape[1])
        for length in range(1, tokens.shape[1] + 1):
            ours = decoder.step(state, tokens[:, length - 1], length - 1)
            reference = captioner.model(pixels, tokens[:, :length], image_latent=image_latent, image_embs=image_embs,
                                        output_labels=False)["logits"][:, -1]
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_the_compiled_step_gives_open_clips_tokens_and_captions_free_of_the_batch(open_clip_generate):
    """The torch.compile'd fixed-shape step (teachers.coca_decoding.CachedCoCa.compiled): greedy tokens still
    open_clip's; its logits those of the eager step at every position; sampled captions the same in a batch of 3
    as in a batch of 17, whose first group compiles the step and whose other two then run in parallel threads."""
    torch.manual_seed(0)
    captioner = Captioner(load_model("md-coca-tiny", warn_random=False), compile_step=True)
    images = [draw_shape(color, shape, 64) for color in ("red", "blue", "green")
              for shape in ("circle", "square", "triangle")]
    pixels = torch.stack([captioner.preprocess(im) for im in images[:3]])
    reference = open_clip_generate(captioner.model, pixels, seq_len=10, min_seq_len=5)
    assert torch.equal(captioner.decode(pixels, 1, None, 0.0, 1.0, 10, 5), reference)

    with torch.no_grad():
        _, image_embs = captioner.model._encode_image(pixels)
    decoder = captioner.decoder
    eager, fixed = decoder.start(image_embs, 1, 10), decoder.start(image_embs, 1, 10)
    for position in range(reference.shape[1]):
        tokens = reference[:, position].contiguous()
        torch.testing.assert_close(decoder.compiled(pixels.device)(fixed, tokens, torch.tensor([position])),
                                   decoder.step(eager, tokens, position), rtol=1e-4, atol=1e-4)

    images = images + images[:8]
    seeds = list(range(100, 117))
    alone = captioner.generate(images[:3], 1, seeds[:3], max_len=8)
    together = captioner.generate(images, 1, seeds, max_len=8)
    assert together[:3] == alone and len(set(map(tuple, together))) > 1


def test_a_step_that_cannot_be_compiled_is_one_line(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    from mdcore.errors import UserInputError

    captioner = Captioner(load_model("md-coca-tiny", warn_random=False), compile_step=True)

    def fails(*args):
        raise BackendCompilerFailed(fails, RuntimeError("C++ compile error\ng++: not found"), None)

    monkeypatch.setattr(captioner.decoder, "compiled", lambda device: fails)
    with pytest.raises(UserInputError, match=r"could not build .*\(C\+\+ compile error\); run without --compile"):
        captioner.generate([draw_shape("red", "circle", 64)], 1, [0], max_len=6)


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_the_nucleus_found_without_sorting_is_the_sorted_definitions(scale):
    """The smallest set of most probable tokens reaching top_p, ties broken by token id, for flat and peaked
    distributions and ties across the boundary; each row's set and token depend on that row alone."""
    from teachers.captioner import _sample_top_p, nucleus

    generator = torch.Generator().manual_seed(int(scale * 10))
    for trial in range(12):
        logits = torch.randn(3, 49408, generator=generator) * scale
        if trial % 3 == 0:
            logits[:, 100:400] = logits.max() - 0.5  # a tie across the nucleus boundary
        keep = nucleus(logits, 0.9).mask()
        probs = torch.softmax(torch.round(logits * 1024).double() / 1024, dim=-1)
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)  # stable: ties by token id
        expected = torch.zeros_like(keep).scatter_(1, order, (ranked.cumsum(-1) - ranked) < 0.9)
        assert torch.equal(keep, expected)
        assert torch.equal(nucleus(logits[1:2], 0.9).mask(), keep[1:2])
        seeds = [torch.Generator().manual_seed(7 + i) for i in range(3)]
        tokens = _sample_top_p(logits, 0.9, seeds)
        assert bool(keep[torch.arange(3), tokens].all())
        assert int(_sample_top_p(logits[2:], 0.9, [torch.Generator().manual_seed(9)])) == int(tokens[2])
