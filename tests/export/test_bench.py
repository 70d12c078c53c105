"""bench: the JSON schema other tools read, eager rows and ratios; never a speed threshold (machines are noisy)."""

import json

from export.bench import BenchConfig, bench_export, time_call
from mobiledistill.cli import main


def test_time_call_reports_median_and_p90():
    calls = []
    timing = time_call(lambda: calls.append(1), runs=7, warmup=3)
    assert len(calls) == 10 and timing["runs"] == 7
    assert 0 <= timing["median_ms"] <= timing["p90_ms"]


def test_bench_json_schema(student_export, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(student_export), "--json", str(out), "--runs", "3", "--warmup", "1"]) == 0
    assert "| file | runtime |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["results"]
    for row in rows:
        assert {"file", "runtime", "threads", "batch", "median_ms", "p90_ms"} <= set(row)
        assert row["batch"] == 1 and row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"]
    onnx_files = {r["file"] for r in rows if r["runtime"] == "onnxruntime"}
    assert onnx_files == {"image_encoder.onnx", "text_encoder.onnx", "image_encoder.int8.onnx",
                          "text_encoder.int8.onnx"}
    threads = {r["threads"] for r in rows}
    assert 1 in threads and max(threads) == result["machine"]["cpu_count"]
    torch_rows = [r for r in rows if r["runtime"] == "torch"]
    assert {r["tower"] for r in torch_rows} == {"image", "text"} and all(r["ratio_to_torch"] == 1 for r in torch_rows)
    assert all(r["ratio_to_torch"] > 0 for r in rows)
    assert result["coreml"]["status"] in ("needs macOS", "measured", "skipped")


def test_bench_without_torch_rows_and_chosen_threads(student_export):
    result = bench_export(student_export, BenchConfig(runs=2, warmup=0, threads=(1,), torch_eager=False,
                                                      progress=False))
    assert {r["runtime"] for r in result["results"]} == {"onnxruntime"}
    assert {r["threads"] for r in result["results"]} == {1}
    assert all(r["ratio_to_torch"] is None for r in result["results"])
