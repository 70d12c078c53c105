"""Where an exported ONNX file spends its time in onnxruntime: kernel time per operator type, and what deleting
one kind of node saves.

    python bench/onnx_profile.py FILE.onnx [--threads 1] [--runs 20] [--drop LayerNormalization --drop Gelu ...]

The input is the one `mobiledistill bench` feeds (a generated image, or the tokenizer's first worked example when
`tokenizer.json` lies beside the file). Prints onnxruntime's profiler totals per operator type per call (the
profiler adds a few microseconds to every node, so compare rows, not the sum, with `bench` medians) and, when the
graph has convolutions, grouped (depthwise) against dense ones. Each `--drop OP` times a copy in which every node
of that type passes its first input through (for `Add`: only adds of two computed tensors, which pass their second,
the residual branch): the numbers are wrong, the saving in median latency against the unchanged file is what it costs.
"""

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export.bench import bench_image_input, bench_text_input, time_call  # noqa: E402
from export.onnx_export import onnx_session  # noqa: E402


def feed_for(path: Path, session) -> dict[str, np.ndarray]:
    tokenizer, preprocess = path.parent / "tokenizer.json", path.parent / "preprocess.json"
    meta = session.get_inputs()[0]
    if "int" in meta.type:
        return {meta.name: bench_text_input(json.loads(tokenizer.read_text()))}
    return {meta.name: bench_image_input(json.loads(preprocess.read_text()))}


def median_ms(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int) -> float:
    session = onnx_session(path, threads=threads)
    return time_call(lambda: session.run(None, feed), runs, warmup=20)["median_ms"]


def profile(path: Path, threads: int, runs: int) -> None:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as work:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.enable_profiling = threads, True
        options.profile_file_prefix = str(Path(work) / "profile")
        options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = feed_for(path, session)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        optimized = onnx.load(str(Path(work) / "optimized.onnx"), load_external_data=False).graph
    group = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in optimized.node}
    calls = runs + 1  # the profiler also records the first run, inside session creation's warm-up
    by_op, nodes, convs = defaultdict(float), defaultdict(set), {"grouped": [0.0, set()], "dense": [0.0, set()]}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op, name = event["args"]["op_name"], event["name"].removesuffix("_kernel_time")
        by_op[op] += event["dur"] / 1000 / calls
        nodes[op].add(name)
        if "Conv" in op:
            kind = convs["grouped" if group.get(name, 1) > 1 else "dense"]
            kind[0] += event["dur"] / 1000 / calls
            kind[1].add(name)
    print(f"{path}: onnxruntime profiler, {threads} thread(s), per call")
    print("| op | nodes | ms |")
    print("|---|---|---|")
    for op, ms in sorted(by_op.items(), key=lambda item: -item[1]):
        print(f"| {op} | {len(nodes[op])} | {ms:.3f} |")
    if convs["grouped"][1] or convs["dense"][1]:
        for kind, (ms, names) in convs.items():
            print(f"{kind} convolutions: {len(names)} nodes, {ms:.2f} ms")


def without(path: Path, op_type: str, destination: Path) -> int:
    """Write a copy of `path` in which every `op_type` node passes an input through; returns how many."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    passed, kept = {}, []
    for node in graph.node:
        computed = [name for name in node.input if name and name not in constants]
        residual_add = op_type != "Add" or len(computed) == 2  # bias adds stay: they fuse into the products
        if node.op_type == op_type and computed and residual_add and node.output[0] not in outputs:
            passed[node.output[0]] = computed[-1] if op_type == "Add" else computed[0]
        else:
            kept.append(node)

    def source(name: str) -> str:
        while name in passed:
            name = passed[name]
        return name

    for node in kept:
        for index, name in enumerate(node.input):
            node.input[index] = source(name)
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save(model, str(destination))
    return len(passed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20, help="profiled runs; timed runs with --drop: 15x this")
    parser.add_argument("--drop", action="append", default=[], help="operator type to pass through (repeatable)")
    args = parser.parse_args()
    path = Path(args.file)
    profile(path, args.threads, args.runs)
    if not args.drop:
        return
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        copies = {op: Path(work) / f"without_{op}.onnx" for op in args.drop}
        counts = {op: without(path, op, copy) for op, copy in copies.items()}
        feed = feed_for(path, onnx_session(path))
        base = median_ms(path, feed, args.threads, 15 * args.runs)
        print(f"\nmedian of {15 * args.runs} runs, {args.threads} thread(s): unchanged {base:.3f} ms")
        print("| without | nodes | ms | saved ms |")
        print("|---|---|---|---|")
        for op, copy in copies.items():
            ms = median_ms(copy, feed, args.threads, 15 * args.runs)
            print(f"| {op} | {counts[op]} | {ms:.3f} | {base - ms:.3f} |")


if __name__ == "__main__":
    main()
