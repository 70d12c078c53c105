"""Where static int8 loses a MobileCLIP image tower's parity: every stage of the trunk kept float in turn.

    python bench/int8_sensitivity.py --arch MobileCLIP2-S0
    python bench/int8_sensitivity.py --arch MobileCLIP2-S0 --bn-images 64 --whole-only

--bn-images N first re-estimates the tower's batch-norm statistics over N further pictures (random weights start
them at mean 0, variance 1, whatever the activations are; a trained tower's match its activations), to see whether
static int8 fails for want of those statistics rather than of trained weights. --whole-only stops after the
everything-int8 line.

The tower is built with random weights and its layer scales at 1 (`export.towers.unit_layer_scales`: at timm's
1e-5 start every image embeds alike and no parity check could fail), rewritten for XNNPACK as the exporter does
(`export.phones.for_xnnpack`) and quantized with ExecuTorch's XNNPACKQuantizer (static, per-channel weights,
activation ranges from 16 calibration images), once with everything quantized and then with the stem, each stage
and the final convolution left float. Each line prints the minimum cosine to the float tower over 8 other images,
computed by the PT2E-converted graph itself (the numerics the lowered program follows, without lowering it). The
exporter keeps a static file only at min cosine >= 0.99.
"""

import argparse
import time

import open_clip
import torch
import torch.nn.functional as F

import mdmodels  # noqa: F401  (registers the shipped architectures)
from export.parity import compare_embeddings
from export.phones import executorch_float, executorch_int8, for_xnnpack, run_reference
from export.towers import ImageEncoder, prepare_for_export, unit_layer_scales


def quantized_min_cosine(encoder, calibration: torch.Tensor, test: torch.Tensor, reference, float_modules=()):
    """Static int8 of `encoder` as the exporter makes it, `float_modules` kept float, by its reference model."""
    program = executorch_float(encoder, test[:1], "the image tower")
    converted = executorch_int8(program, "static", [x[None] for x in calibration], keep_float=tuple(float_modules))
    return compare_embeddings(reference, run_reference(converted, test))["min_cosine"]


def recalibrate_batch_norms(tower: torch.nn.Module, pictures: torch.Tensor) -> None:
    """Every batch norm's running mean and variance set to their averages over `pictures` (batches of 16)."""
    norms = [m for m in tower.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over every batch
    tower.train()
    with torch.no_grad():
        for chunk in pictures.split(16):
            tower(chunk)
    tower.eval()
    print(f"{len(norms)} batch norms re-estimated over {len(pictures)} pictures")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="MobileCLIP2-S0")
    parser.add_argument("--bn-images", type=int, default=0, help="re-estimate batch-norm statistics on N pictures")
    parser.add_argument("--whole-only", action="store_true", help="only the everything-int8 line")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = open_clip.create_model(args.arch)
    unit_layer_scales(model)
    size = open_clip.get_model_config(args.arch)["vision_cfg"]["image_size"]
    g = torch.Generator().manual_seed(1)  # smooth random pictures: low-frequency noise, upsampled
    pictures = F.interpolate(torch.rand(24 + args.bn_images, 3, 8, 8, generator=g), size=(size, size),
                             mode="bicubic").clamp(0, 1)
    x = (pictures - 0.45) / 0.27
    calibration, test = x[:16], x[16:24]
    if args.bn_images:
        recalibrate_batch_norms(model.visual, x[24:])
    model = prepare_for_export(model).model  # folds the batch norms into the convolutions
    with torch.no_grad():
        reference = ImageEncoder(model)(test).numpy()  # (8, D)
    encoder = for_xnnpack(ImageEncoder(model), "executorch", reference.shape[1]).eval()
    names = [n for n, _ in encoder.named_modules()]
    trunk = next(n for n in names if n.endswith("visual.trunk"))
    stages = sorted(n for n in names if n.startswith(f"{trunk}.stages.") and n.count(".") == trunk.count(".") + 2)
    variants = [("everything int8", ())] + [(f"{m.removeprefix(trunk + '.')} float", (m,)) for m in
                                           [f"{trunk}.stem", *stages, f"{trunk}.final_conv"] if m in names]
    print(f"{args.arch}, {size} px, static int8 (XNNPACKQuantizer), min cosine to float over {len(test)} images:")
    results = {}
    for label, float_modules in variants[:1] if args.whole_only else variants:
        start = time.time()
        results[float_modules] = cosine = quantized_min_cosine(encoder, calibration, test, reference, float_modules)
        print(f"  {label:<40} {cosine:.4f}   ({time.time() - start:.0f} s)", flush=True)
    if args.whole_only:
        return
    # then the most sensitive parts together, as the ONNX path's search keeps its most sensitive nodes float
    ranked = [m for m, _ in sorted(((k[0], v) for k, v in results.items() if k), key=lambda kv: -kv[1])]
    for count in (2, 3):
        float_modules = tuple(ranked[:count])
        start = time.time()
        cosine = quantized_min_cosine(encoder, calibration, test, reference, float_modules)
        label = " + ".join(m.removeprefix(trunk + ".") for m in float_modules) + " float"
        print(f"  {label:<40} {cosine:.4f}   ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
