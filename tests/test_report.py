"""report: one self-contained HTML page with a table of runs, a Pareto plot and training curves."""

import json
import re
import shutil

from export.bench import BenchConfig, bench_export
from mobiledistill.cli import main
from mobiledistill.report import pareto_front, summarize_run

EVALUATION = {"zeroshot": {"top1": 0.25, "top5": 0.5, "mean_per_class_recall": 0.2, "num_classes": 3},
              "retrieval": {"image_to_text": {"R@1": 0.125, "R@5": 0.5, "R@10": 1.0},
                            "text_to_image": {"R@1": 0.0625, "R@5": 0.5, "R@10": 1.0}},
              "num_samples": 12, "split": "test"}


def _run_dir(source, target, top1, with_log=True):
    shutil.copytree(source, target)
    provenance = json.loads((target / "mobiledistill.json").read_text() or "{}")
    evaluation = json.loads(json.dumps(EVALUATION))
    evaluation["zeroshot"]["top1"] = top1
    provenance.update(evaluation=evaluation, steps=20)
    (target / "mobiledistill.json").write_text(json.dumps(provenance))
    if with_log:
        rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3} for s in range(0, 20, 5)]
        (target / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


def test_pareto_front_keeps_runs_nothing_beats():
    rows = [{"name": "a", "top1": 0.5, "image_latency_ms": 10.0}, {"name": "b", "top1": 0.4, "image_latency_ms": 5.0},
            {"name": "c", "top1": 0.3, "image_latency_ms": 8.0}, {"name": "d", "top1": None, "image_latency_ms": 1.0}]
    assert [r["name"] for r in pareto_front(rows)] == ["b", "a"]


def test_report_html_is_self_contained(tiny_model_dirs, student_export, tmp_path, capsys):
    fast = _run_dir(tiny_model_dirs["teacher_b"], tmp_path / "student", 0.25)
    (fast / "export").symlink_to(student_export)
    result = bench_export(student_export, BenchConfig(runs=2, warmup=0, torch_eager=False, progress=False))
    (tmp_path / "bench.json").write_text(json.dumps(result))
    shutil.copy(tmp_path / "bench.json", fast / "bench.json")
    slow = _run_dir(tiny_model_dirs["teacher_a"], tmp_path / "teacher", 0.5, with_log=False)

    out = tmp_path / "report.html"
    assert main(["report", str(fast), str(slow), "--out", str(out), "--latency-runs", "2"]) == 0
    assert "Pareto front" in capsys.readouterr().out
    page = out.read_text()
    assert page.count("<tr class=") == 2 and "25.0%" in page and "50.0%" in page and "12.5%" in page
    assert "onnxruntime fp32" in page and "torch eager" in page  # each row says where its latency came from
    sources = re.findall(r"""src=['"]([^'"]+)['"]""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # nothing to fetch
    assert len(sources) == 2  # the Pareto plot and the student's curves; the teacher has no log
    assert "No training log" in page


def test_summarize_run_counts_parameters_by_tower(tiny_model_dirs, tmp_path):
    run = _run_dir(tiny_model_dirs["teacher_b"], tmp_path / "run", 0.1)
    row = summarize_run(run, latency_runs=1)
    assert row["image_params"] > 0 and row["text_params"] > 0
    assert row["params"] == row["image_params"] + row["text_params"]
    assert row["top1"] == 0.1 and row["retrieval_R@1"] == 0.125 and row["image_latency_ms"] > 0
