"""Export: every shipped student and a MobileCLIP FastViT tower to ONNX with parity, int8, CoreML specs, the files
an app reads, and bad input (no weights, an operator without ONNX conversion, a missed parity bound)."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from distill.evaluate import evaluate_model
from export import ExportConfig, ExportError, export_loaded_model, export_model
from export.coreml import coreml_unavailable_reason
from export.smoothing import SMOOTHING_ALPHAS
from mdmodels import load_model
from mdmodels.registry import SHIPPED_ARCHITECTURES
from mobiledistill.cli import main

STUDENTS = [a for a in SHIPPED_ARCHITECTURES if a == "md-student-tiny" or a.startswith("TinyCLIP-")]
FAST_STUDENTS = {"md-student-tiny", "TinyCLIP-ViT-8M-16-Text-3M"}


def _no_leftovers(parent):
    return not [p for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("arch", [a if a in FAST_STUDENTS else pytest.param(a, marks=pytest.mark.slow)
                                  for a in STUDENTS])
def test_every_shipped_student_exports_to_onnx_with_parity(arch, tmp_path):
    report = export_model(arch, tmp_path / "out", ExportConfig(formats=("onnx",), num_parity_samples=2,
                                                               progress=False))
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        entry = report["files"][name]
        assert entry["max_abs_diff"] <= 1e-4 and entry["min_cosine"] >= 0.9999
        assert entry["inputs"][0]["shape"][0] not in (1, 2)  # a symbolic batch axis
    text_input = report["files"]["text_encoder.onnx"]["inputs"][0]
    assert text_input["dtype"] == "tensor(int32)"
    assert json.loads((tmp_path / "out" / "export_report.json").read_text()) == report


def test_an_architecture_without_weights_exports_the_same_file_every_time(tmp_path):
    config = ExportConfig(formats=("onnx",), towers=("image",), num_parity_samples=2, progress=False)
    first, second = (tmp_path / "first", tmp_path / "second")
    for out in (first, second):
        torch.manual_seed(len(list(tmp_path.iterdir())))  # whatever the caller's seed, the export sets its own
        export_model("md-student-tiny", out, config)
    assert (first / "image_encoder.onnx").read_bytes() == (second / "image_encoder.onnx").read_bytes()


def test_pretrained_bert_text_tower_is_smoothed_to_full_int8(tmp_path):
    """md-student-minilm's text tower is the pretrained all-MiniLM-L6-v2, whose outlier activations defeat plain
    int8: the export smooths them on calibration captions and then quantizes every product."""
    report = export_model("md-student-minilm", tmp_path / "out", ExportConfig(
        formats=("onnx",), towers=("text",), quantize="int8", num_parity_samples=8, progress=False))
    entry = report["files"]["text_encoder.int8.onnx"]
    assert entry["smoothing_alpha"] in SMOOTHING_ALPHAS and entry["smoothed_activations"] > 0
    assert entry["float32_nodes"] == [] and entry["min_cosine"] >= 0.99 and entry["calibration_samples"] > 0
    assert "smoothed before quantization" in (tmp_path / "out" / "README.md").read_text()


def test_fastvit_tower_is_reparameterized_exported_and_int8_static(fastvit_model_dir, tmp_path):
    report = export_model(str(fastvit_model_dir), tmp_path / "out",
                          ExportConfig(formats=("onnx",), quantize="int8", num_parity_samples=2,
                                       num_calibration_samples=4, progress=False))
    assert report["reparameterized_modules"] > 10  # MobileOne / RepMixer branches folded before export
    image = report["files"]["image_encoder.onnx"]
    assert image["max_abs_diff"] <= 1e-4 and image["min_cosine"] >= 0.9999
    int8 = report["files"]["image_encoder.int8.onnx"]
    assert int8["method"] == "static_qdq" and int8["calibration_samples"] == 4 and int8["min_cosine"] >= 0.99
    assert report["files"]["text_encoder.int8.onnx"]["method"] == "dynamic"
    # Dense convolutions are int8; grouped ones stay float and take a float input, so that onnxruntime does not
    # quantize their weights itself (it does when a DequantizeLinear feeds them).
    graph = onnx.load(str(tmp_path / "out" / "image_encoder.int8.onnx")).graph
    producer = {name: node.op_type for node in graph.node for name in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    grouped = [n for n in convs if next((a.i for a in n.attribute if a.name == "group"), 1) > 1]
    assert len(grouped) == int8["float32_grouped_convs"] > 0
    assert all(producer.get(n.input[1]) != "DequantizeLinear" for n in grouped)
    assert all(producer.get(n.input[0]) != "DequantizeLinear" for n in grouped)
    assert all(producer.get(n.input[1]) == "DequantizeLinear" for n in convs if n not in grouped)
    assert "grouped (depthwise) convolutions" in (tmp_path / "out" / "README.md").read_text()


def test_int8_parity_and_zero_shot_change_on_a_dataset(student_export, tiny_model_dirs, shapes_root, tmp_path):
    report = json.loads((student_export / "export_report.json").read_text())
    for name in ("image_encoder.int8.onnx", "text_encoder.int8.onnx"):
        assert report["files"][name]["min_cosine"] >= 0.99
        assert report["files"][name]["bytes"] < report["files"][name.replace(".int8", "")]["bytes"]
    with_data = export_model(str(tiny_model_dirs["teacher_b"]), tmp_path / "out",
                             ExportConfig(formats=("onnx",), quantize="int8", data=str(shapes_root),
                                          num_parity_samples=4, num_calibration_samples=4, progress=False))
    assert with_data["parity_inputs"]["source"].startswith("dataset")
    zeroshot = with_data["zeroshot"]
    assert zeroshot["num_classes"] == 3 and 0 <= zeroshot["fp32_top1"] <= 1 and 0 <= zeroshot["int8_top1"] <= 1
    assert zeroshot["top1_change_points"] == pytest.approx(100 * (zeroshot["int8_top1"] - zeroshot["fp32_top1"]))
    # the eager towers' zero-shot is `eval`'s (the same open_clip classifier and protocol)
    evaluated = evaluate_model(load_model(str(tiny_model_dirs["teacher_b"])), shapes_root, "test", progress=False)
    assert zeroshot["eager_top1"] == pytest.approx(evaluated["zeroshot"]["top1"])


def test_onnx_outputs_match_eager_open_clip(student_export, tiny_model_dirs):
    """The exported graphs reproduce plain open_clip on real preprocessing and tokenization, any batch size."""
    import onnxruntime as ort
    from PIL import Image

    loaded = load_model(str(tiny_model_dirs["teacher_b"]))
    images = [Image.new("RGB", (80, 60), c) for c in ("red", "navy", "white")]
    texts = ["a red circle.", "a photo of a cat", "x"]
    with torch.no_grad():
        ref_image = torch.nn.functional.normalize(loaded.model.encode_image(
            torch.stack([loaded.preprocess(im) for im in images])), dim=-1).numpy()
        ref_text = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(texts)), dim=-1).numpy()
    image_session = ort.InferenceSession(str(student_export / "image_encoder.onnx"))
    text_session = ort.InferenceSession(str(student_export / "text_encoder.onnx"))
    pixels = torch.stack([loaded.preprocess(im) for im in images]).numpy()
    got_image = image_session.run(None, {"image": pixels})[0]
    got_text = text_session.run(None, {"text": loaded.tokenizer(texts).numpy().astype(np.int32)})[0]
    np.testing.assert_allclose(got_image, ref_image, atol=1e-4)
    np.testing.assert_allclose(got_text, ref_text, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got_image, axis=1), 1, atol=1e-5)


def test_app_files_and_readme_snippet(student_export, tiny_model_dirs, tmp_path):
    preprocess = json.loads((student_export / "preprocess.json").read_text())
    assert preprocess["size"] == [64, 64] and len(preprocess["mean"]) == 3 and len(preprocess["std"]) == 3
    assert preprocess["interpolation"] == "bicubic"
    tokenizer = json.loads((student_export / "tokenizer.json").read_text())
    assert tokenizer["kind"] == "clip_bpe" and tokenizer["context_length"] == 32
    loaded = load_model(str(tiny_model_dirs["teacher_b"]))
    for example in tokenizer["examples"]:
        ids = loaded.tokenizer([example["text"]])[0].tolist()
        assert ids[: len(example["ids"])] == example["ids"] and example["ids"][-1] == tokenizer["eot_token_id"]
        assert [tokenizer["vocab"][loaded.tokenizer.decoder[i]] for i in example["ids"]] == example["ids"]
    assert len(tokenizer["merges"]) == len(loaded.tokenizer.bpe_ranks)

    readme = (student_export / "README.md").read_text()
    assert "```swift" in readme and "```python" in readme
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    work = tmp_path / "app"
    work.mkdir()
    for name in ("image_encoder.onnx", "text_encoder.onnx", "preprocess.json", "tokenizer.json"):
        (work / name).symlink_to(student_export / name)
    from PIL import Image

    Image.new("RGB", (90, 70), "orange").save(work / "photo.jpg")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=work, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    similarity = float(result.stdout.split("similarity")[1])
    assert -1.0 <= similarity <= 1.0


@pytest.mark.skipif(coreml_unavailable_reason() is not None, reason=str(coreml_unavailable_reason()))
def test_coreml_packages_pass_spec_validation(student_export):
    report = json.loads((student_export / "export_report.json").read_text())
    image, text = report["files"]["image_encoder.mlpackage"], report["files"]["text_encoder.mlpackage"]
    assert image["precision"] == "fp16" and image["spec"]["compute_precision"] == "fp16"
    assert image["spec"]["inputs"] == [{"name": "image", "type": "image", "shape": [1, 3, 64, 64], "dtype": "RGB"}]
    assert text["spec"]["inputs"] == [{"name": "text", "type": "multiarray", "shape": [1, 32], "dtype": "INT32"}]
    for entry in (image, text):
        assert entry["spec"]["outputs"][0]["shape"] == [1, 128] and entry["spec"]["outputs"][0]["dtype"] == "FLOAT32"
        assert entry["spec"]["specification_version"] >= 8  # iOS17
    assert text["precision"] in ("fp16", "fp32") and text["fp16_eager_min_cosine"] <= 1.0 + 1e-9
    assert (text["precision"] == "fp16") == (text["fp16_eager_min_cosine"] >= 0.999)
    if sys.platform != "darwin":
        assert image["min_cosine"] is None and "ONNX only" in report["coreml_note"]
    assert (student_export / "image_encoder.mlpackage" / "Manifest.json").is_file()


@pytest.mark.skipif(coreml_unavailable_reason() is not None, reason=str(coreml_unavailable_reason()))
def test_coreml_text_tower_falls_back_to_fp32_when_fp16_drifts(tiny_model_dirs, tmp_path):
    report = export_model(str(tiny_model_dirs["teacher_b"]), tmp_path / "out",
                          ExportConfig(formats=("coreml",), num_parity_samples=2, coreml_text_fp16_min_cosine=1.01,
                                       progress=False))
    text = report["files"]["text_encoder.mlpackage"]
    assert text["precision"] == "fp32" and text["spec"]["compute_precision"] == "fp32"
    assert "FP32" in text["precision_reason"]
    assert not (tmp_path / "out" / "text_encoder.onnx").exists()  # ONNX was only the parity reference
    assert report["files"]["text_encoder.onnx"]["kept"] is False


def test_model_dir_without_weights_fails_cleanly(tiny_model_dirs, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "open_clip_config.json").write_text((tiny_model_dirs["teacher_b"] / "open_clip_config.json").read_text())
    assert main(["export", "--model", str(broken), "--out", str(tmp_path / "out"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "no weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


class _MedianPool(torch.nn.Module):
    """A stand-in image tower using an operator the ONNX exporter cannot convert (aten.median)."""

    def __init__(self, dim: int, preprocess_cfg: dict):
        super().__init__()
        self.proj = torch.nn.Linear(3, dim)
        self.preprocess_cfg = preprocess_cfg

    def forward(self, x):
        return self.proj(x.flatten(2).median(dim=2).values)


def test_operator_without_onnx_conversion_names_op_and_tower(tiny_model_dirs, tmp_path):
    loaded = load_model(str(tiny_model_dirs["teacher_b"]))
    loaded.model.visual = _MedianPool(loaded.embed_dim, loaded.preprocess_cfg)
    with pytest.raises(ExportError, match=r"image tower.*aten\.median"):
        export_loaded_model(loaded, tmp_path / "out", ExportConfig(formats=("onnx",), num_parity_samples=2,
                                                                   progress=False))
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_missed_parity_bound_fails_and_leaves_nothing(tiny_model_dirs, tmp_path):
    with pytest.raises(ExportError, match="image_encoder.onnx misses its parity bound: min cosine"):
        export_model(str(tiny_model_dirs["teacher_b"]), tmp_path / "out",
                     ExportConfig(formats=("onnx",), num_parity_samples=2, fp32_min_cosine=1.5, progress=False))
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_cli_bad_input_is_one_line(tiny_model_dirs, tmp_path, capsys):
    existing = tmp_path / "exists"
    existing.mkdir()
    cases = [
        ["export", "--model", str(tiny_model_dirs["teacher_b"]), "--out", str(existing), "--format", "onnx"],
        ["export", "--model", str(tiny_model_dirs["teacher_b"]), "--out", str(tmp_path / "o"), "--format", "tflite"],
        ["export", "--model", "no such arch!", "--out", str(tmp_path / "o")],
        ["export", "--model", str(tiny_model_dirs["teacher_b"]), "--out", str(tmp_path / "o"), "--format", "onnx",
         "--data", str(tmp_path / "missing")],
        ["bench", str(tmp_path / "missing")],
        ["bench", str(existing)],
        ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("mobiledistill: error:") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.html").exists()
