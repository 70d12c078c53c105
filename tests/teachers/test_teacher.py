import pytest
import torch

from teachers import Captioner, Teacher, TeacherEnsemble, load_model
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


def test_tensor_path_matches_each_teachers_own_size(ensemble):
    images = torch.rand(2, 3, 96, 96)  # any size: each teacher resizes to its own
    assert ensemble.encode_image_tensors(images).shape == (2, 256)


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


def test_last_position_logits_equal_open_clips_forward():
    """The captioner projects only the last position onto the vocabulary; the logits must be open_clip's."""
    torch.manual_seed(0)
    captioner = Captioner(load_model("md-coca-tiny", warn_random=False))
    pixels = torch.stack([captioner.preprocess(draw_shape("red", "circle", 64))] * 2)
    tokens = torch.tensor([[49406, 320, 1125, 539], [49406, 320, 2866, 539]])
    with torch.no_grad():
        image_latent, image_embs = captioner.model._encode_image(pixels)
        reference = captioner.model(pixels, tokens, image_latent=image_latent, image_embs=image_embs,
                                    output_labels=False)["logits"][:, -1]
        ours = captioner._next_token_logits(image_embs, tokens)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_nucleus_candidates_give_the_full_sorts_tokens(scale):
    """Sorting only the most probable candidates must keep every token (and order) the full sort puts in the
    nucleus, ties and flat distributions included (those fall back to the full sort)."""
    from teachers.captioner import _sorted_nucleus

    generator = torch.Generator().manual_seed(int(scale * 10))
    for trial in range(20):
        logits = torch.randn(3, 49408, generator=generator) * scale
        if trial % 4 == 0:
            logits[:, 100:400] = logits.max()  # a tie across the candidate boundary
        probs = torch.softmax(torch.round(logits.double() * 1024) / 1024, dim=-1)
        values, ids = _sorted_nucleus(probs, 0.9)
        full_values, full_ids = probs.sort(dim=-1, descending=True, stable=True)
        nucleus = int(((full_values.cumsum(-1) - full_values) < 0.9).sum(-1).max())
        assert nucleus <= ids.shape[1]
        assert torch.equal(ids[:, :nucleus], full_ids[:, :nucleus])
        assert torch.equal(values[:, :nucleus], full_values[:, :nucleus])
