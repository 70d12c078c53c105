"""How far a PT2E int8 reference model, run in PyTorch, is from the ExecuTorch program lowered from it.

    python bench/int8_reference_gap.py --arch md-student-tiny
    python bench/int8_reference_gap.py --arch MobileCLIP2-S0 --tower image

The exporter checks each ExecuTorch int8 method on its reference model first and lowers it only when that check
comes within `export.exporter.REFERENCE_MARGIN` of the bound, so the margin must cover the difference between the
two. For each tower (random weights; MobileCLIP layer scales at 1 so that outputs vary) and each method, this
prints the minimum cosine to the float tower over 8 inputs computed by the reference model and by the lowered
`.pte` in `executorch.runtime`, their difference, and the seconds taken by torch.export, by the quantization and by
the lowering (calibration: the same 8 inputs).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from export.parity import compare_embeddings
from export.phones import executorch_float, executorch_int8, for_xnnpack, run_reference, to_executorch
from export.runtimes import open_runner
from export.towers import ImageEncoder, TextEncoder, prepare_for_export, unit_layer_scales
from mdmodels import load_model

TEXTS = ["a cat", "a red square", "two dogs on a hill", "x", "an emoji of a face", "blue", "the moon", "a car"]


def towers(arch: str) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(1)
    loaded = load_model(arch, warn_random=False)
    model = prepare_for_export(loaded.model).model
    unit_layer_scales(model)
    size = getattr(model.visual, "image_size", 256)
    size = size[0] if isinstance(size, tuple | list) else size
    images = torch.randn(len(TEXTS), 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"image": (ImageEncoder(model).eval(), images),
            "text": (TextEncoder(model).eval(), loaded.tokenizer(TEXTS).to(torch.int32))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", default=None)
    parser.add_argument("--tower", action="append", choices=["image", "text"], default=None)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="int8-gap-"))
    print("| model | tower | method | min cosine, reference in PyTorch | lowered, in ExecuTorch | difference | "
          "export s | quantize s | lower s |\n|---|---|---|---|---|---|---|---|---|")
    for arch in args.arch or ["md-student-tiny"]:
        for name, (module, inputs) in towers(arch).items():
            if args.tower and name not in args.tower:
                continue
            with torch.no_grad():
                eager = module(inputs).numpy()
            start = time.perf_counter()
            program = executorch_float(for_xnnpack(module, "executorch", eager.shape[1]), inputs[:1], name)
            export_s = time.perf_counter() - start
            for method in ("static", "dynamic", "dynamic_matmul"):
                start = time.perf_counter()
                reference = executorch_int8(program, method, [x[None] for x in inputs])
                quantize_s = time.perf_counter() - start
                in_pytorch = compare_embeddings(eager, run_reference(reference, inputs))["min_cosine"]
                path = out / f"{arch}-{name}-{method}.pte"
                start = time.perf_counter()
                to_executorch(reference, inputs[:1], path)
                lower_s = time.perf_counter() - start
                lowered = compare_embeddings(eager, open_runner(path)(inputs.numpy()))["min_cosine"]
                print(f"| {arch} | {name} | {method} | {in_pytorch:.5f} | {lowered:.5f} | {lowered - in_pytorch:+.5f} "
                      f"| {export_s:.1f} | {quantize_s:.1f} | {lower_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
