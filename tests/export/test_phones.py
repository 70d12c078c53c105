"""Android's runtimes: the student exported to ExecuTorch and LiteRT, every file run in its own runtime (XNNPACK)
against eager PyTorch, zero-shot beside eager, timed by `bench`; pixel inputs; parity that can fail."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from export import ExportConfig, ExportError, export_model
from export.bench import BenchConfig, bench_export
from export.exporter import REFERENCE_MARGIN
from export.parity import outputs_vary
from export.runtimes import open_runner, unavailable_reason
from export.towers import ImageEncoder, prepare_for_export
from mdmodels import load_model
from mobiledistill.cli import main

pytestmark = pytest.mark.skipif(bool(unavailable_reason("executorch") or unavailable_reason("litert")),
                                reason="the phone runtimes are not installed for this platform")

PHONE_FILES = [f"{tower}_encoder{precision}{suffix}" for suffix in (".pte", ".tflite")
               for tower in ("image", "text") for precision in ("", ".int8")]


def export_in_child(spec, out, **config) -> subprocess.CompletedProcess:
    """`export_model` in a process of its own: LiteRT's converter imports JAX, whose threads make every later
    fork of this test process (DataLoader workers) unsafe."""
    code = ("import json, sys; from export import ExportConfig, ExportError, export_model; "
            "export_model(sys.argv[1], sys.argv[2], ExportConfig(**json.loads(sys.argv[3]), progress=False))")
    return subprocess.run([sys.executable, "-c", code, str(spec), str(out), json.dumps(config)], capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def phone_export(tiny_model_dirs, tmp_path_factory):
    from tests.conftest import write_shapes_root

    root = write_shapes_root(tmp_path_factory.mktemp("phones") / "shapes", size=64)
    out = tmp_path_factory.mktemp("phones") / "export"
    # Random weights rank near-tied classes: int8 may move a few of the handful of test images, so the zero-shot
    # gate is exercised apart (test_a_file_far_below_eager_zero_shot_fails_the_export).
    child = export_in_child(tiny_model_dirs["teacher_b"], out, formats=["onnx", "executorch", "litert"],
                            quantize="int8", data=str(root), num_parity_samples=4, num_calibration_samples=4,
                            zeroshot_max_drop=100.0)
    assert child.returncode == 0, child.stderr
    return out, json.loads((out / "export_report.json").read_text()), root


def test_every_phone_file_is_checked_in_its_own_runtime(phone_export):
    out, report, _ = phone_export
    for name in PHONE_FILES:
        entry = report["files"][name]
        assert (out / name).is_file() and entry["bytes"] == (out / name).stat().st_size
        assert entry["format"] == ("executorch" if name.endswith(".pte") else "litert")
        assert entry["checked_by"] == ("executorch" if name.endswith(".pte") else "litert") + " (XNNPACK)"
        if ".int8." in name:
            assert entry["precision"] == "int8" and entry["min_cosine"] >= 0.99 and entry["method"] == "dynamic"
        else:
            assert entry["precision"] == "fp32" and entry["max_abs_diff"] <= 1e-4 and entry["min_cosine"] >= 0.9999
        assert entry["delegated_nodes"] > 0 and entry["nodes_outside_delegate"] == sum(
            entry["ops_outside_delegate"].values())
    text = report["files"]["text_encoder.tflite"]
    assert text["inputs"][0]["dtype"] == "int32" and text["inputs"][0]["shape"] == [1, 32]
    # What a phone gets is what was checked: the stored file's own outputs, rerun here.
    runner = open_runner(out / "image_encoder.pte")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert runner(x).shape == (2, report["embed_dim"])


def test_zero_shot_is_reported_for_every_pair_beside_eager(phone_export):
    _, report, _ = phone_export
    z = report["zeroshot"]
    pairs = {(p["format"], p["precision"]) for p in z["pairs"]}
    assert pairs == {(f, p) for f in ("onnx", "executorch", "litert") for p in ("fp32", "int8")}
    for pair in z["pairs"]:
        assert pair["change_points_vs_eager"] == pytest.approx(100 * (pair["top1"] - z["eager_top1"]))
        if pair["precision"] == "fp32":  # fp32 files match eager to 1e-6: the same ranking
            assert pair["top1"] == z["eager_top1"]
    assert report["files"]["image_encoder.int8.tflite"]["zeroshot_top1"] is not None


def test_readme_has_a_kotlin_snippet_per_format(phone_export):
    out, _, _ = phone_export
    readme = (out / "README.md").read_text()
    for marker in ("Module.load(\"$dir/image_encoder.pte\")", "Interpreter(File(\"$dir/image_encoder.tflite\")",
                   "OrtEnvironment.getEnvironment()", " outside: "):
        assert marker in readme


def test_bench_times_pte_and_tflite_in_their_runtimes(phone_export):
    out, _, _ = phone_export
    result = bench_export(out, BenchConfig(runs=2, warmup=1, threads=(1, 2), progress=False))
    runtimes = {(r["file"], r["runtime"], r["threads"]) for r in result["results"]}
    for name in PHONE_FILES:
        runtime = "executorch" if name.endswith(".pte") else "litert"
        assert {(name, runtime, 1), (name, runtime, 2)} <= runtimes
    assert all(r["median_ms"] > 0 and r["batch"] == 1 for r in result["results"])


def test_a_file_far_below_eager_zero_shot_fails_the_export(phone_export, tiny_model_dirs, tmp_path):
    _, _, root = phone_export
    out = tmp_path / "out"
    # A negative allowance: each file must beat eager by a point, which fp32 files (eager's ranking) cannot.
    child = export_in_child(tiny_model_dirs["teacher_b"], out, formats=["executorch"], data=str(root),
                            num_parity_samples=2, zeroshot_max_drop=-1.0)
    assert child.returncode != 0 and "ExportError" in child.stderr
    assert "image_encoder.pte + text_encoder.pte: zero-shot top-1" in child.stderr
    assert "points, below the +1 allowed" in child.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_pixel_input_normalizes_inside_every_format(tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    child = export_in_child(tiny_model_dirs["teacher_b"], out, formats=["onnx", "executorch", "litert"],
                            towers=["image"], image_input="uint8", num_parity_samples=2)
    assert child.returncode == 0, child.stderr
    report = json.loads((out / "export_report.json").read_text())
    loaded = load_model(str(tiny_model_dirs["teacher_b"]), warn_random=False)
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["image_input"] == "uint8" and pre["onnx_input"]["shape"] == ["batch", 64, 64, 3]
    pixels = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    unit = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    normalized = (unit - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    with torch.no_grad():  # the float pipeline an app would otherwise run itself
        expected = ImageEncoder(prepare_for_export(loaded.model).model)(normalized).numpy()
    for name in ("image_encoder.onnx", "image_encoder.pte", "image_encoder.tflite"):
        assert report["files"][name]["inputs"][0]["dtype"] in ("tensor(uint8)", "uint8")
        np.testing.assert_allclose(open_runner(out / name)(pixels), expected, atol=1e-4)


def test_outputs_that_do_not_vary_make_parity_meaningless_and_say_so(fastvit_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    assert outputs_vary(rng.standard_normal((8, 16)))["varies"]
    alike = np.ones((8, 16)) + 1e-4 * rng.standard_normal((8, 16))
    check = outputs_vary(alike)
    assert not check["varies"] and check["mean_pairwise_cosine"] > 0.999
    # A random-weight FastViT (layer scales at their 1e-5 start) embeds every image alike: the export warns.
    with pytest.warns(UserWarning, match="nearly the same output"):
        report = export_model(str(fastvit_model_dir), tmp_path / "out", ExportConfig(
            formats=("onnx",), towers=("image",), num_parity_samples=4, progress=False))
    assert report["parity_inputs"]["eager_outputs_vary"]["image"]["varies"] is False


def test_executorch_runners_refuse_to_run_after_a_thread_pool_reset(phone_export):
    out, _, _ = phone_export
    x = np.zeros((1, 1, 32), dtype=np.int32)[0]
    first = open_runner(out / "text_encoder.pte", threads=1)
    first(x)
    second = open_runner(out / "text_encoder.pte", threads=2)
    np.testing.assert_allclose(second(x), open_runner(out / "text_encoder.onnx")(x), atol=1e-5)
    with pytest.raises(RuntimeError, match="thread pool was reset"):
        first(x)


def test_a_runtime_missing_for_the_platform_is_one_line(tiny_model_dirs, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "litert_torch" else real(name, *a))
    code = main(["export", "--model", str(tiny_model_dirs["teacher_b"]), "--out", str(tmp_path / "tfl"),
                 "--format", "onnx,litert"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "litert_torch" in err and "not installed" in err
    assert not (tmp_path / "tfl").exists()
    assert main(["export", "--model", str(tiny_model_dirs["teacher_b"]), "--out", str(tmp_path / "pte"),
                 "--format", "executorch"]) == 0
    assert (tmp_path / "pte" / "image_encoder.pte").is_file()
    assert "jax" not in sys.modules  # nothing here imported LiteRT's converter (see export_in_child)


def test_int8_tries_static_first_for_convolutional_towers_and_then_each_fallback(tiny_model_dirs, tmp_path,
                                                                                 monkeypatch):
    """The method order of a convolutional tower (static, dynamic, dynamic of the matrix products), on the student's
    image tower taken for one (a FastViT runs the same code at several times the cost): the first method within
    the bound is kept, and when none is, the error names every attempt."""
    import export.exporter

    monkeypatch.setattr(export.exporter, "quantization_method",
                        lambda path, tower: "static_qdq" if tower == "image" else "dynamic")
    spec = str(tiny_model_dirs["teacher_b"])
    report = export_model(spec, tmp_path / "out", ExportConfig(
        formats=("executorch",), towers=("image",), quantize="int8", num_parity_samples=3,
        num_calibration_samples=3, progress=False))
    pte = report["files"]["image_encoder.int8.pte"]
    assert pte["tried"][0]["method"] == "static" and pte["tried"][-1]["method"] == pte["method"]
    assert all(t.get("min_cosine", -1) < 0.99 for t in pte["tried"][:-1]) and pte["min_cosine"] >= 0.99
    assert "checked_by" not in pte["tried"][-1]  # what is kept was lowered and checked in ExecuTorch itself
    # static int8 comes further below this bound than REFERENCE_MARGIN in PyTorch already: it is never lowered
    assert pte["tried"][0]["min_cosine"] < 0.9999999 - REFERENCE_MARGIN
    with pytest.raises(ExportError, match=r"every int8 method \(static [0-9.]+ in PyTorch, dynamic [0-9.]+, "
                                          r"dynamic_matmul [0-9.]+;"):
        export_model(spec, tmp_path / "strict", ExportConfig(
            formats=("executorch",), towers=("image",), quantize="int8", num_parity_samples=3,
            num_calibration_samples=3, int8_min_cosine=0.9999999, progress=False))
    assert not (tmp_path / "strict").exists()


def test_a_hugging_face_text_tower_lowers_to_int8_executorch(tmp_path):
    """md-student-minilm's BERT text tower: PT2E used to turn the integer scalars of its attention-mask arithmetic
    into float constants, and calibration failed; its SDPA guards are replaced by the written-out attention."""
    report = export_model("md-student-minilm", tmp_path / "out", ExportConfig(
        formats=("executorch",), towers=("text",), quantize="int8", num_parity_samples=4, progress=False))
    for name in ("text_encoder.pte", "text_encoder.int8.pte"):
        entry = report["files"][name]
        assert entry["min_cosine"] >= (0.99 if ".int8." in name else 0.9999)
        assert "aten_any_dim" not in entry["ops_outside_delegate"]  # no SDPA all-masked-row guard left


def test_quantized_litert_inputs_and_outputs_are_scaled_as_the_report_says():
    """Static int8 `.tflite` files take int8 in and give int8 out; the runner (and an app) scale by the tensor's
    own scale and zero point, while float tensors and uint8 pixels pass as they are."""
    from export.runtimes import _dequantized, _quantized

    detail = {"dtype": np.int8, "quantization": (0.5, -3)}
    q = _quantized(np.array([[-1.0, 0.0, 1.26, 100.0]], dtype=np.float32), detail)
    assert q.dtype == np.int8 and q.tolist() == [[-5, -3, 0, 127]]  # rounded, offset, clipped to int8
    np.testing.assert_allclose(_dequantized(q, detail), [[-1.0, 0.0, 1.5, 65.0]])
    pixels = np.array([[0, 255]], dtype=np.uint8)
    assert _quantized(pixels, {"dtype": np.uint8, "quantization": (0.0, 0)}).tolist() == [[0, 255]]
    floats = np.array([[0.25]], dtype=np.float32)
    assert _quantized(floats, {"dtype": np.float32, "quantization": (0.0, 0)}).tolist() == [[0.25]]
