"""The small files an app needs beside the encoders: preprocess.json, tokenizer.json and a README with snippets."""

import json
from typing import Any

import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

from mdmodels.specs import LoadedModel

__all__ = ["preprocess_json", "tokenizer_json", "export_readme", "TOKENIZER_EXAMPLES"]

TOKENIZER_EXAMPLES = ("a photo of a dog.", "An emoji of a woman technologist!", "cat")


def preprocess_json(loaded: LoadedModel, image_input: str = "float") -> dict[str, Any]:
    """Size, mean, std, interpolation and the resize rule of the image tower (open_clip's preprocess_cfg), and the
    input the exported image encoders take: normalized float NCHW, or uint8 RGB pixels NHWC (`image_input`)."""
    cfg = loaded.preprocess_cfg
    size = cfg["size"]
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return {
        "size": [height, width],
        "mean": [float(m) for m in cfg["mean"]],
        "std": [float(s) for s in cfg["std"]],
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
        "image_input": image_input,
        "steps": [f"resize the shorter side to {min(height, width)} ({cfg.get('interpolation', 'bicubic')})",
                  f"center-crop to {height} x {width}",
                  *(["RGB, scale to [0, 1]", "subtract mean, divide by std", "layout NCHW float32"]
                    if image_input == "float" else ["RGB uint8, layout NHWC (the encoders normalize inside)"])],
        "onnx_input": ({"name": "image", "shape": ["batch", 3, height, width], "dtype": "float32",
                        "normalized": True} if image_input == "float" else
                       {"name": "image", "shape": ["batch", height, width, 3], "dtype": "uint8",
                        "normalized": False, "note": "scale and mean/std normalization are inside the graph"}),
        "phone_input": ({"name": "image", "shape": [1, 3, height, width], "dtype": "float32", "normalized": True}
                        if image_input == "float" else
                        {"name": "image", "shape": [1, height, width, 3], "dtype": "uint8", "normalized": False}),
        "coreml_input": {"name": "image", "type": "RGB image", "size": [height, width],
                         "normalized": False, "note": "mean/std normalization is inside the CoreML model"},
    }


def tokenizer_json(loaded: LoadedModel) -> dict[str, Any]:
    """Everything an app needs to turn text into the text tower's int32 input, with worked examples to test a port.

    CLIP BPE tokenizers (open_clip's SimpleTokenizer) are written out in full: the byte-level vocabulary, the merge
    list in rank order and the special tokens. Hugging Face tokenizers are embedded as their own tokenizer.json.
    """
    tokenizer = loaded.tokenizer
    context_length = int(getattr(tokenizer, "context_length", None) or loaded.model_cfg["text_cfg"]["context_length"])
    result: dict[str, Any] = {"context_length": context_length, "input_name": "text", "dtype": "int32"}
    if isinstance(tokenizer, SimpleTokenizer):
        merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
        result.update({
            "kind": "clip_bpe",
            "clean": _clean_name(tokenizer),
            "sot_token_id": tokenizer.sot_token_id,
            "eot_token_id": tokenizer.eot_token_id,
            "pad_token_id": 0,
            "layout": "[sot] + bpe(text) + [eot], truncated to context_length with eot kept last, padded with 0",
            "pattern": tokenizer.pat.pattern,
            "vocab": tokenizer.encoder,
            "merges": [" ".join(pair) for pair in merges],
        })
    elif isinstance(tokenizer, HFTokenizer):
        hf = tokenizer.tokenizer
        result.update({
            "kind": "huggingface",
            "clean": _clean_name(tokenizer),
            "strip_sep_token": bool(getattr(tokenizer, "strip_sep_token", False)),
            "pad_token_id": int(hf.pad_token_id or 0),
            "layout": "the Hugging Face tokenizer with its special tokens, truncated and padded to context_length",
            "hf_tokenizer": json.loads(hf.backend_tokenizer.to_str()) if hasattr(hf, "backend_tokenizer") else None,
        })
    else:
        result.update({"kind": type(tokenizer).__name__,
                       "note": "no portable description for this tokenizer; the examples show its output"})
    ids = tokenizer(list(TOKENIZER_EXAMPLES)).to(torch.int32)
    result["examples"] = [{"text": text, "ids": [int(i) for i in row[: _length(row)]]}
                          for text, row in zip(TOKENIZER_EXAMPLES, ids)]
    return result


def _length(row: torch.Tensor) -> int:
    nonzero = (row != 0).nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def _clean_name(tokenizer) -> str:
    name = getattr(getattr(tokenizer, "clean_fn", None), "__name__", "")
    return name.removeprefix("_clean_") or "none"


def export_readme(report: dict[str, Any], preprocess: dict[str, Any], tokenizer: dict[str, Any]) -> str:
    """A short README for the export directory: what each file is, and Python and Swift snippets."""
    files = report["files"]
    height, width = preprocess["size"]
    lines = [f"# Exported encoders of `{report['model']}`", "",
             f"Written by `mobiledistill export`. Embeddings are {report['embed_dim']}-d and L2-normalized, so the "
             "similarity of an image and a text is the dot product of their embeddings.", "",
             "| file | tower | precision | max abs diff | min cosine | checked by |", "|---|---|---|---|---|---|"]
    for name, entry in files.items():
        diff = "-" if entry.get("max_abs_diff") is None else f"{entry['max_abs_diff']:.2e}"
        cos = "-" if entry.get("min_cosine") is None else f"{entry['min_cosine']:.6f}"
        lines.append(f"| `{name}` | {entry['tower']} | {entry['precision']} | {diff} | {cos} | {entry['checked_by']} |")
    lines += ["", "`preprocess.json`: resize, crop and normalization of the image input. `tokenizer.json`: the "
              f"tokenizer ({tokenizer['kind']}, context length {tokenizer['context_length']}, int32 ids) with worked "
              "examples to test a port against. `export_report.json`: the parity numbers above and how they were "
              "measured.", ""]
    fused = [name for name, entry in files.items() if entry.get("fused_attention")]
    if fused:
        lines += [", ".join(f"`{name}`" for name in fused) + " fuse self-attention into onnxruntime's contrib "
                  "`QAttention` op: they run in onnxruntime (desktop, and its full mobile package), not in other ONNX "
                  "runtimes. The fp32 `.onnx` files use standard ONNX operators only.", ""]
    grouped = [(name, entry["float32_grouped_convs"]) for name, entry in files.items()
               if entry.get("float32_grouped_convs")]
    for name, count in grouped:
        lines += [f"`{name}` keeps its {count} grouped (depthwise) convolutions, and the ops that feed them, in "
                  "float32: onnxruntime's int8 kernels for them are slower than its float ones on a CPU.", ""]
    for name, entry in files.items():
        if entry.get("smoothed_activations"):
            lines += [f"`{name}` had {entry['smoothed_activations']} activation tensors smoothed before quantization "
                      f"(SmoothQuant, alpha {entry['smoothing_alpha']}, on {entry['calibration_samples']} calibration "
                      "inputs): their outlier channels' range moved into the weights; same values in float.", ""]
    if report.get("coreml_note"):
        lines += [report["coreml_note"], ""]
    delegated = [(name, entry) for name, entry in files.items() if entry.get("nodes_outside_delegate") is not None]
    if delegated:
        lines += ["The `.pte` (ExecuTorch) and `.tflite` (LiteRT) files take batch 1 and run on XNNPACK; what runs "
                  "outside it, per file:", ""]
        for name, entry in delegated:
            ops = ", ".join(f"{op} x{n}" for op, n in entry["ops_outside_delegate"].items()) or "nothing"
            method = f" ({entry['method']} int8)" if entry.get("method") else ""
            lines.append(f"- `{name}`{method}: {entry['delegated_nodes']} nodes in XNNPACK, "
                         f"{entry['nodes_outside_delegate']} outside: {ops}")
        lines.append("")
    for name, entry in files.items():
        quantized = [(io, d) for io in ("inputs", "outputs") for d in entry.get(io, []) if "scale" in d]
        if quantized:
            lines += [f"`{name}` (static int8) takes and gives int8 tensors: quantize its input as "
                      "`q = round(x / scale) + zero_point` and read its output as `(q - zero_point) * scale`, with "
                      + ", ".join(f"{io[:-1]} scale {d['scale']:.6g}, zero point {d['zero_point']}"
                                  for io, d in quantized) + ".", ""]
    zeroshot = report.get("zeroshot")
    if zeroshot and zeroshot.get("pairs"):
        lines += [f"Zero-shot top-1 on `{zeroshot['split']}` ({zeroshot['num_samples']} images, "
                  f"{zeroshot['num_classes']} classes): eager PyTorch {100 * zeroshot['eager_top1']:.1f}%; "
                  + "; ".join(f"{p['format']} {p['precision']} {100 * p['top1']:.1f}%" for p in zeroshot["pairs"])
                  + ".", ""]
    text_file = "text_encoder.onnx"
    if tokenizer["kind"] == "clip_bpe":
        tokenize = ["from open_clip.tokenizer import SimpleTokenizer  # CLIP's BPE: the vocab and merges in "
                    "tokenizer.json",
                    "tokenize = SimpleTokenizer(context_length=tok[\"context_length\"], clean=tok[\"clean\"])",
                    "ids = tokenize([\"a photo of a dog.\"]).numpy().astype(np.int32)"]
    elif tokenizer["kind"] == "huggingface":
        tokenize = ["from tokenizers import Tokenizer",
                    "hf = Tokenizer.from_str(json.dumps(tok[\"hf_tokenizer\"]))",
                    "hf.enable_truncation(tok[\"context_length\"])",
                    "hf.enable_padding(length=tok[\"context_length\"], pad_id=tok[\"pad_token_id\"])",
                    "ids = np.array([hf.encode(\"a photo of a dog.\").ids], dtype=np.int32)"]
    else:
        tokenize = ["ids = np.array([tok[\"examples\"][0][\"ids\"]], dtype=np.int32)  # pad to context_length"]
    lines += ["## Python (onnxruntime)", "", "```python", "import json", "", "import numpy as np",
              "import onnxruntime as ort", "from PIL import Image", "",
              "pre = json.load(open(\"preprocess.json\"))", "tok = json.load(open(\"tokenizer.json\"))",
              "image_encoder = ort.InferenceSession(\"image_encoder.onnx\")",
              f"text_encoder = ort.InferenceSession(\"{text_file}\")", "",
              "h, w = pre[\"size\"]",
              "image = Image.open(\"photo.jpg\").convert(\"RGB\")",
              "scale = max(h / image.height, w / image.width)",
              "image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)",
              "left, top = (image.width - w) // 2, (image.height - h) // 2",
              "image = image.crop((left, top, left + w, top + h))",
              *(["x = np.asarray(image, dtype=np.uint8)[None]  # (1, H, W, 3): the encoder normalizes inside"]
                if preprocess.get("image_input") == "uint8" else
                ["x = (np.asarray(image, dtype=np.float32) / 255 - pre[\"mean\"]) / pre[\"std\"]",
                 "x = x.transpose(2, 0, 1)[None].astype(np.float32)  # (1, 3, H, W)"]),
              *tokenize,
              "image_embedding = image_encoder.run(None, {\"image\": x})[0]  # (1, D), unit length",
              "text_embedding = text_encoder.run(None, {\"text\": ids})[0]  # (1, D), unit length",
              "print(\"similarity\", float(image_embedding[0] @ text_embedding[0]))", "```", ""]
    lines += ["## Swift (CoreML)", "",
              "Add `image_encoder.mlpackage` and `text_encoder.mlpackage` to the Xcode project (Xcode compiles them "
              "and generates the `image_encoder` / `text_encoder` classes). The image input takes a "
              f"{width} x {height} RGB `CVPixelBuffer` (center-cropped as `preprocess.json` says); the normalization "
              "is inside the model. Token ids come from a port of `tokenizer.json`; its `examples` are the ids to "
              "expect.", "", "```swift", "import CoreML", "",
              "func similarity(pixelBuffer: CVPixelBuffer, tokenIds: [Int32]) throws -> Float {",
              "    let config = MLModelConfiguration()",
              "    config.computeUnits = .all",
              "    let imageModel = try image_encoder(configuration: config)",
              "    let textModel = try text_encoder(configuration: config)",
              "    let imageEmbedding = try imageModel.prediction(image: pixelBuffer).image_embedding",
              f"    let text = try MLMultiArray(shape: [1, {tokenizer['context_length']}], dataType: .int32)",
              "    for (i, id) in tokenIds.enumerated() { text[[0, i] as [NSNumber]] = NSNumber(value: id) }",
              "    let textEmbedding = try textModel.prediction(text: text).text_embedding",
              "    var dot: Float = 0  // both embeddings are unit length: the dot product is the cosine",
              "    for i in 0..<imageEmbedding.count {",
              "        dot += imageEmbedding[i].floatValue * textEmbedding[i].floatValue",
              "    }",
              "    return dot",
              "}", "```", ""]
    lines += _kotlin_snippets(report, preprocess, tokenizer)
    return "\n".join(lines)


def _kotlin_snippets(report: dict[str, Any], preprocess: dict[str, Any], tokenizer: dict[str, Any]) -> list[str]:
    '""Android snippets for the formats in the export: ONNX Runtime, ExecuTorch and LiteRT, all from Kotlin.""'
    height, width = preprocess["size"]
    length, dim = tokenizer["context_length"], report["embed_dim"]
    pixels = preprocess.get("image_input") == "uint8"
    if pixels:
        image_comment = f"RGB bytes of the {width} x {height} center crop, row by row (NHWC uint8)"
        shape = f"1, {height}, {width}, 3"
    else:
        image_comment = f"the {width} x {height} center crop, normalized as preprocess.json says (NCHW float32)"
        shape = f"1, 3, {height}, {width}"
    pixel_type = "ByteArray" if pixels else "FloatArray"
    formats = {entry["format"] for entry in report["files"].values() if entry.get("kept", True)}
    lines = ["## Kotlin (Android)", "", "Token ids come from a port of `tokenizer.json` (its `examples` are the ids "
             "to expect); both embeddings are unit length, so their dot product is the cosine.", ""]
    if "onnx" in formats:
        lines += ["ONNX Runtime (`com.microsoft.onnxruntime:onnxruntime-android`):", "", "```kotlin",
                  "import ai.onnxruntime.OnnxTensor",
                  "import ai.onnxruntime.OrtEnvironment",
                  "import java.nio.IntBuffer",
                  *(["import java.nio.ByteBuffer", "import ai.onnxruntime.OnnxJavaType"] if pixels
                    else ["import java.nio.FloatBuffer"]), "",
                  f"fun embedOnnx(dir: String, pixels: {pixel_type}, tokenIds: IntArray): "
                  "Pair<FloatArray, FloatArray> {",
                  f"    // pixels: {image_comment}; tokenIds: {length} int32 ids",
                  "    val env = OrtEnvironment.getEnvironment()",
                  '    val imageSession = env.createSession("$dir/image_encoder.onnx")',
                  '    val textSession = env.createSession("$dir/text_encoder.onnx")',
                  (f"    val image = OnnxTensor.createTensor(env, ByteBuffer.wrap(pixels), longArrayOf({shape}), "
                   "OnnxJavaType.UINT8)" if pixels else
                   f"    val image = OnnxTensor.createTensor(env, FloatBuffer.wrap(pixels), longArrayOf({shape}))"),
                  f"    val text = OnnxTensor.createTensor(env, IntBuffer.wrap(tokenIds), longArrayOf(1, {length}))",
                  '    val imageOut = imageSession.run(mapOf("image" to image))[0].value',
                  '    val textOut = textSession.run(mapOf("text" to text))[0].value',
                  "    val imageEmbedding = (imageOut as Array<FloatArray>)[0]",
                  "    val textEmbedding = (textOut as Array<FloatArray>)[0]",
                  "    return imageEmbedding to textEmbedding",
                  "}", "```", ""]
    if "executorch" in formats:
        lines += ["ExecuTorch (`org.pytorch:executorch-android`, XNNPACK inside):", "", "```kotlin",
                  "import org.pytorch.executorch.EValue",
                  "import org.pytorch.executorch.Module",
                  "import org.pytorch.executorch.Tensor", "",
                  f"fun embedExecuTorch(dir: String, pixels: {pixel_type}, tokenIds: IntArray): "
                  "Pair<FloatArray, FloatArray> {",
                  f"    // pixels: {image_comment}; tokenIds: {length} int32 ids",
                  '    val imageEncoder = Module.load("$dir/image_encoder.pte")  // or image_encoder.int8.pte',
                  '    val textEncoder = Module.load("$dir/text_encoder.pte")',
                  (f"    val image = Tensor.fromBlobUnsigned(pixels, longArrayOf({shape}))" if pixels else
                   f"    val image = Tensor.fromBlob(pixels, longArrayOf({shape}))"),
                  f"    val text = Tensor.fromBlob(tokenIds, longArrayOf(1, {length}))",
                  "    val imageEmbedding = imageEncoder.forward(EValue.from(image))[0].toTensor().dataAsFloatArray",
                  "    val textEmbedding = textEncoder.forward(EValue.from(text))[0].toTensor().dataAsFloatArray",
                  "    return imageEmbedding to textEmbedding",
                  "}", "```", ""]
    if "litert" in formats:
        element = "1" if pixels else "4"
        put = "input.put(pixels)" if pixels else "input.asFloatBuffer().put(pixels)"
        lines += ["LiteRT (`com.google.ai.edge.litert:litert`; XNNPACK is its default CPU delegate):", "",
                  "```kotlin",
                  "import java.io.File",
                  "import java.nio.ByteBuffer",
                  "import java.nio.ByteOrder",
                  "import org.tensorflow.lite.Interpreter", "",
                  f"fun embedLiteRT(dir: String, pixels: {pixel_type}, tokenIds: IntArray): "
                  "Pair<FloatArray, FloatArray> {",
                  f"    // pixels: {image_comment}; tokenIds: {length} int32 ids",
                  "    val options = Interpreter.Options().setNumThreads(4)",
                  '    val imageEncoder = Interpreter(File("$dir/image_encoder.tflite"), options)  // or .int8.tflite',
                  '    val textEncoder = Interpreter(File("$dir/text_encoder.tflite"), options)',
                  f"    val input = ByteBuffer.allocateDirect({element} * pixels.size).order(ByteOrder.nativeOrder())",
                  f"    {put}",
                  f"    val imageEmbedding = Array(1) {{ FloatArray({dim}) }}",
                  "    imageEncoder.run(input, imageEmbedding)",
                  f"    val textEmbedding = Array(1) {{ FloatArray({dim}) }}",
                  "    textEncoder.run(arrayOf(tokenIds), textEmbedding)",
                  "    return imageEmbedding[0] to textEmbedding[0]",
                  "}", "```", ""]
    return lines
