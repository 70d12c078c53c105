"""Does a change move any result? The same small runs on another commit and on this working tree, compared.

    python bench/same_results.py --ref 17cde89 --out runs/same-results

On the commit `--ref` (checked out into a git worktree under --out) and on this tree, each through its own
`python -m distill` with this environment's packages: a small emoji set; md-teacher-s trained for 12 steps; a
reinforced set written once (by the reference) and md-student-tiny distilled from it for 10 steps; the student
exported to ONNX and ExecuTorch. Printed: whether the teacher's and the student's logged losses are identical,
whether the ONNX graphs have the same operators in the same order, and each file's parity and what stays outside
XNNPACK. A refactoring that claims to leave every figure where it was should print "same" on every line.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(tree: Path, *args: str) -> None:
    """`python -m distill ARGS` with `tree`'s packages first on the path (its own directory is the working one)."""
    subprocess.run([sys.executable, "-m", "distill", *args], cwd=tree, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="the commit to compare with")
    parser.add_argument("--out", default="runs/same-results")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if out.exists():
        raise SystemExit(f"{out} exists: pick another --out")
    out.mkdir(parents=True)
    ref_tree = out / "ref-tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(ref_tree), args.ref], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    trees = {"ref": ref_tree, "new": REPO}
    try:
        run(ref_tree, "data", "emoji", "--out", str(out / "emoji"), "--limit", "120")
        for name, tree in trees.items():
            run(tree, "teachers", "train", "--data", str(out / "emoji"), "--arch", "md-teacher-s", "--out",
                str(out / f"{name}-teacher"), "--steps", "12", "--batch-size", "16", "--warmup-steps", "3",
                "--num-workers", "0", "--eval-split", "none")
        run(ref_tree, "reinforce", "--data", str(out / "emoji"), "--teacher", str(out / "ref-teacher"),
            "--num-augs", "2", "--num-captions", "0", "--out", str(out / "dr"), "--num-workers", "0")
        for name, tree in trees.items():
            run(tree, "distill", "--data", str(out / "dr"), "--student", "md-student-tiny", "--out",
                str(out / f"{name}-student"), "--steps", "10", "--batch-size", "16", "--num-workers", "0",
                "log_every=1", "warmup_steps=2")
            run(tree, "export", "--model", str(out / "ref-student"), "--out", str(out / f"{name}-export"),
                "--format", "onnx,executorch")
        compare(out)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=REPO, check=False)


def compare(out: Path) -> None:
    import onnx

    def same(flag: bool) -> str:
        return "same" if flag else "DIFFERENT"

    teacher = [json.loads((out / f"{n}-teacher" / "mobiledistill.json").read_text())["history"] for n in ("ref", "new")]
    losses = [[r["loss"] for r in h] for h in teacher]
    print(f"teacher training losses ({len(losses[0])} logged rows): {same(losses[0] == losses[1])}")
    logs = [[json.loads(line) for line in (out / f"{n}-student" / "log.jsonl").read_text().splitlines()]
            for n in ("ref", "new")]
    keys = [k for k in logs[0][0] if k != "elapsed_s"]
    rows = [[{k: r.get(k) for k in keys} for r in log] for log in logs]
    print(f"distillation log rows ({len(rows[0])}, every term): {same(rows[0] == rows[1])}")
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        ops = [[n.op_type for n in onnx.load(out / f"{t}-export" / name).graph.node] for t in ("ref", "new")]
        print(f"{name} operators ({len(ops[0])} nodes): {same(ops[0] == ops[1])}")
    reports = [json.loads((out / f"{t}-export" / "export_report.json").read_text())["files"] for t in ("ref", "new")]
    for name, entry in reports[0].items():
        other = reports[1].get(name, {})
        keys = ("min_cosine", "max_abs_diff", "nodes_outside_delegate")
        print(f"{name} parity and delegation: {same(all(entry.get(k) == other.get(k) for k in keys))}")


if __name__ == "__main__":
    main()
