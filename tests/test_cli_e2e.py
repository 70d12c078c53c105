"""End to end through the command line, as a user on a fresh machine runs it (own Hugging Face cache, offline)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_shapes_root

pytestmark = pytest.mark.slow


def run_cli(*args: str, env: dict, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "distill", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"mobiledistill {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("home")
    env = dict(os.environ)
    env.update(HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
    return env


def test_emoji_subset_train_reload_with_plain_open_clip_and_eval(tmp_path, fresh_env):
    data, model_dir, result = tmp_path / "emoji", tmp_path / "teacher", tmp_path / "eval.json"
    run_cli("data", "emoji", "--out", str(data), "--limit", "120", env=fresh_env, cwd=tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["train"] > 0 and manifest["splits"]["test"] > 0
    run_cli("teachers", "train", "--data", str(data), "--arch", "md-teacher-m", "--out", str(model_dir),
            "--steps", "4", "--batch-size", "16", "--warmup-steps", "1", env=fresh_env, cwd=tmp_path)
    assert (model_dir / "open_clip_model.safetensors").is_file()
    provenance = json.loads((model_dir / "mobiledistill.json").read_text())
    assert provenance["steps"] == 4 and provenance["text_locked"] is True
    assert "evaluation" in provenance  # the test split was evaluated after training

    # Plain open_clip, no mobiledistill import, no network: the model directory must load by itself.
    code = (
        "import open_clip, torch\n"
        f"m, _, pre = open_clip.create_model_and_transforms('local-dir:{model_dir}')\n"
        f"tok = open_clip.get_tokenizer('local-dir:{model_dir}')\n"
        "print(m.encode_text(tok(['an emoji of a cat.'])).shape[-1])\n"
    )
    env = {k: v for k, v in fresh_env.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "256"

    run_cli("eval", "--model", str(model_dir), "--data", str(data), "--json", str(result), env=fresh_env,
            cwd=tmp_path)
    metrics = json.loads(result.read_text())
    assert set(metrics["zeroshot"]) >= {"top1", "top5", "mean_per_class_recall", "num_classes"}
    assert metrics["zeroshot"]["num_classes"] == manifest["num_classes"]
    for direction in ("image_to_text", "text_to_image"):
        assert set(metrics["retrieval"][direction]) == {"R@1", "R@5", "R@10"}
        assert all(0.0 <= v <= 1.0 for v in metrics["retrieval"][direction].values())
    assert metrics["num_samples"] == manifest["splits"]["test"]


# Each case runs in a fork of one interpreter that has imported the command line once: a process of its own (own
# stderr, own exit status, nothing left from the case before) without paying the interpreter and torch start-up
# once per case. `test_the_entry_point_exits_2_on_bad_input` runs one case as a whole new process.
BAD_INPUT = [
        (["eval", "--model", "ViT-B-32@laion2b_s34b_b79k", "--data", "."], "no network is reachable"),
        (["eval", "--model", "hf-hub:apple/MobileCLIP2-S0", "--data", "."], "no network is reachable"),
        (["eval", "--model", "not-an-arch", "--data", "."], "unknown architecture"),
        (["eval", "--model", "A@", "--data", "."], "malformed model spec"),
        (["eval", "--model", "md-teacher-s", "--data", "missing-dir"], "dataset root not found"),
        (["teachers", "train", "--data", "missing-dir", "--arch", "md-teacher-s", "--out", "x"], "not found"),
        (["teachers", "train", "--data", "SHAPES", "--arch", "md-teacher-s", "--out", "x", "--steps", "0"],
         "steps must be >= 1"),
        (["teachers", "train", "--data", "SHAPES", "--arch", "nope", "--out", "x"], "unknown architecture"),
        (["teachers", "list", "--bogus-flag"], "unrecognized arguments"),
        (["reinforce", "--data", "SHAPES", "--teacher", "md-teacher-s", "--out", "x", "--num-captions", "2"],
         "needs a --captioner"),
        (["reinforce", "--data", "SHAPES", "--teacher", "md-teacher-s", "--captioner", "md-teacher-s", "--out", "x"],
         "not a captioner"),
        (["reinforce", "--data", "SHAPES", "--teacher", "bad@", "--out", "x", "--num-captions", "0"],
         "malformed model spec"),
        (["reinforce", "--data", "missing-dir", "--teacher", "md-teacher-s", "--out", "x", "--num-captions", "0"],
         "not found"),
        (["inspect", "missing-dir"], "not found"),
    ]

FORK_EACH_CASE = r"""
import json, os, sys, traceback
import mobiledistill.commands  # what every command imports, once, before any fork
from mobiledistill.cli import main
results = []
for case in json.loads(sys.argv[1]):
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.chdir(case["cwd"])
        os.dup2(os.open("stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        try:
            code = main(case["args"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    results.append({"returncode": status, "stderr": open(os.path.join(case["cwd"], "stderr.txt")).read()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, fresh_env) -> list[dict]:
    root = tmp_path_factory.mktemp("bad-input")
    shapes = write_shapes_root(root / "shapes")
    cases = []
    for i, (args, _) in enumerate(BAD_INPUT):
        cwd = root / f"case{i}"
        cwd.mkdir()
        cases.append({"cwd": str(cwd), "args": [str(shapes) if a == "SHAPES" else a for a in args]})
    proc = subprocess.run([sys.executable, "-c", FORK_EACH_CASE, json.dumps(cases)], env=fresh_env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return [dict(r, cwd=Path(c["cwd"])) for r, c in zip(results, cases)]


def _is_one_line_exit_2(run: dict, message: str) -> None:
    assert run["returncode"] == 2, run["stderr"]
    lines = [line for line in run["stderr"].strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, run["stderr"]
    assert message in lines[0]
    assert "Traceback" not in run["stderr"]


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[m for _, m in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(bad_input_runs, case):
    run = bad_input_runs[case]
    _is_one_line_exit_2(run, BAD_INPUT[case][1])
    assert not (run["cwd"] / "x").exists()


def test_the_entry_point_exits_2_on_bad_input(tmp_path, fresh_env):
    proc = run_cli("eval", "--model", "not-an-arch", "--data", ".", env=fresh_env, cwd=tmp_path, check=False)
    _is_one_line_exit_2({"returncode": proc.returncode, "stderr": proc.stderr}, "unknown architecture")
