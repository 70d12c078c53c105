"""The quickstart end to end at toy size (`--fast`), and stage reuse on a second run."""

import json
import subprocess
import sys

import pytest

SUMMARY_ROW_KEYS = {"name", "role", "model_dir", "params", "top1", "retrieval_R@1", "image_latency_ms"}


def _quickstart(out, *extra):
    return subprocess.run([sys.executable, "-m", "distill", "quickstart", "--out", str(out), "--fast", *extra],
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_fast_quickstart_runs_every_stage_and_reuses_finished_ones(tmp_path):
    out = tmp_path / "qs"
    first = _quickstart(out)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"data_dir", "rows", "wall_s"}
    assert [r["name"] for r in summary["rows"]] == ["teacher-m", "teacher-s", "student", "baseline"]
    assert [r["role"] for r in summary["rows"]] == ["teacher", "teacher", "student", "baseline"]
    for row in summary["rows"]:
        assert set(row) >= SUMMARY_ROW_KEYS
        assert 0 <= row["top1"] <= 1 and 0 <= row["retrieval_R@1"] <= 1
        assert row["params"] > 0 and row["image_latency_ms"] > 0
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["student"]["params"] == rows["baseline"]["params"]  # the same architecture
    assert rows["student"]["image_params"] < rows["teacher-m"]["image_params"]
    checks = summary["checks"]
    assert checks["student_image_speedup_vs_teacher_m"] == pytest.approx(
        rows["teacher-m"]["image_latency_ms"] / rows["student"]["image_latency_ms"])
    assert checks["student_minus_baseline_points"] == pytest.approx(
        100 * (rows["student"]["top1"] - rows["baseline"]["top1"]))

    export = out / "export" / "student"
    for name in ("image_encoder.onnx", "text_encoder.onnx", "image_encoder.int8.onnx", "text_encoder.int8.onnx",
                 "preprocess.json", "tokenizer.json", "export_report.json"):
        assert (export / name).is_file(), name
    from export.coreml import coreml_unavailable_reason

    if coreml_unavailable_reason() is None:
        assert (export / "image_encoder.mlpackage").is_dir() and (export / "text_encoder.mlpackage").is_dir()
    assert summary["export"]["coreml"]
    page = (out / "report.html").read_text()
    assert "mobiledistill quickstart" in page and "teacher-m" in page and "data:image/png;base64" in page
    assert "speed-up" in first.stdout and "student - baseline" in first.stdout

    # A second run reuses every finished stage; a deleted stage is redone, and only it.
    redo = out / "eval"
    for path in sorted(redo.iterdir()):
        path.unlink()
    redo.rmdir()
    second = _quickstart(out)
    assert second.returncode == 0, second.stderr[-3000:]
    lines = [line for line in second.stdout.splitlines() if line.startswith("[")]
    reused = [line for line in lines if "reusing" in line]
    assert len(reused) == 9, lines  # all but the evaluation and the summary
    assert any(line.startswith("[8/11] evaluate") and "reusing" not in line for line in lines)
    again = json.loads((out / "summary.json").read_text())
    assert [r["top1"] for r in again["rows"]] == [r["top1"] for r in summary["rows"]]


def test_quickstart_refuses_bad_input(tmp_path):
    (tmp_path / "file").write_text("x")
    result = _quickstart(tmp_path / "file")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is a file (expected a directory)" in result.stderr
    result = subprocess.run([sys.executable, "-m", "distill", "quickstart", "--out", str(tmp_path / "q"),
                             "--distill-steps", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and "--distill-steps" in result.stderr
