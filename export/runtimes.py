"""Every exported file run in the runtime a phone runs it in, behind one call.

    open_runner(path, threads) -> Runner      .onnx in onnxruntime, .pte in ExecuTorch, .tflite in LiteRT
    runner(x)                                 (N, ...) inputs -> (N, D) outputs; batch-1 files run row by row

ExecuTorch's and LiteRT's Python runtimes run the same XNNPACK kernels as their Android builds, on x86 too, so
what is checked and timed here is the file a phone runs. Each runtime loads on first use; `unavailable_reason`
says in one line why a format cannot be made on this machine.
"""

import contextlib
import importlib.util
import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from export.onnx_export import onnx_session

__all__ = ["Runner", "open_runner", "run_rows", "format_of", "RUNTIME_OF_FORMAT", "SUFFIX_OF_FORMAT",
           "unavailable_reason", "quiet_native", "PHONE_FORMATS"]

PHONE_FORMATS = ("executorch", "litert")
SUFFIX_OF_FORMAT = {"onnx": ".onnx", "coreml": ".mlpackage", "executorch": ".pte", "litert": ".tflite"}
RUNTIME_OF_FORMAT = {"onnx": "onnxruntime", "coreml": "coreml", "executorch": "executorch", "litert": "litert"}
_PACKAGES = {"executorch": ("executorch",), "litert": ("litert_torch", "ai_edge_litert", "ai_edge_quantizer")}


def format_of(path: str | Path) -> str:
    suffix = Path(path).suffix
    for name, known in SUFFIX_OF_FORMAT.items():
        if suffix == known:
            return name
    raise ValueError(f"{path}: not an exported encoder (known suffixes: {', '.join(SUFFIX_OF_FORMAT.values())})")


def unavailable_reason(fmt: str) -> str | None:
    """Why `fmt` cannot be exported and checked here, in one line; None when it can."""
    missing = [p for p in _PACKAGES.get(fmt, ()) if importlib.util.find_spec(p) is None]
    if missing:
        return (f"--format {fmt} needs {', '.join(missing)}, which is not installed for this platform "
                "(pip install 'mobiledistill[phones]')")
    return None


@contextlib.contextmanager
def quiet_native():
    """Silence what the phone toolchains print on their own (native INFO lines on file descriptors 1 and 2, the
    quantizer's progress bars and size reports): an export or bench prints its own one-line results. Errors still
    arrive as exceptions."""
    # torchao's import-time notices, and the exporters' and converters' own logs
    for name in ("torch.utils._pytree", "torch.export", "torch._export", "executorch", "litert_torch", "absl", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


class Runner:
    """One loaded file: `runner(x)` maps a batch of inputs to a batch of embeddings."""

    runtime: str
    batch_size: int | None  # None: any batch; 1: the file takes one input at a time

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return run_rows(self.run, x, self.batch_size)


def run_rows(run, x: np.ndarray, batch_size: int | None, largest: int = 64) -> np.ndarray:
    """`run` over `x` in batches of `batch_size` (or up to `largest` rows when any batch goes)."""
    step = batch_size or largest
    return np.concatenate([run(x[i:i + step]) for i in range(0, len(x), step)])


class _OnnxRunner(Runner):
    runtime, batch_size = "onnxruntime", None

    def __init__(self, path: Path, threads: int | None):
        self.session = onnx_session(path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x):
        return self.session.run(None, {self.input_name: x})[0]


class _ExecutorchRunner(Runner):
    """A `.pte` through `executorch.runtime`. XNNPACK's thread pool is one per process and a loaded method keeps
    the pool it was loaded with, so asking for another thread count resets the pool and invalidates every runner
    loaded before (they refuse to run rather than touch a freed pool)."""

    runtime, batch_size = "executorch", 1
    _generation = 0

    def __init__(self, path: Path, threads: int | None):
        from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        threads = threads or os.cpu_count() or 1
        if _threadpool_get_thread_count() != threads:
            _unsafe_reset_threadpool(threads)
            _ExecutorchRunner._generation += 1
        self.generation = _ExecutorchRunner._generation
        self.method = Runtime.get().load_program(Path(path)).load_method("forward")
        self._torch = torch

    def run(self, x):
        if self.generation != _ExecutorchRunner._generation:
            raise RuntimeError("this ExecuTorch runner was loaded before the thread pool was reset; open it again")
        return np.asarray(self.method.execute([self._torch.from_numpy(np.ascontiguousarray(x))])[0])


class _LiteRTRunner(Runner):
    """A `.tflite` in ai-edge-litert's interpreter, whose default delegate is XNNPACK (as on Android)."""

    runtime, batch_size = "litert", 1

    def __init__(self, path: Path, threads: int | None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1)
        self.interpreter.allocate_tensors()  # XNNPACK takes its partitions here
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def run(self, x):
        self.interpreter.set_tensor(self.input["index"], _quantized(x, self.input))
        self.interpreter.invoke()
        return _dequantized(self.interpreter.get_tensor(self.output["index"]), self.output)


def _quantized(x: np.ndarray, detail: dict) -> np.ndarray:
    """`x` as the tensor takes it: as is, or, for a quantized input (static int8 files take int8 in and give int8
    out), `round(x / scale) + zero_point`, what an app does with the scale and zero point the report gives."""
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if scale and np.issubdtype(detail["dtype"], np.integer) and not np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.round(x / scale) + zero_point, info.min, info.max)
    return np.ascontiguousarray(x, dtype=detail["dtype"])


def _dequantized(y: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if scale and np.issubdtype(detail["dtype"], np.integer):
        return (y.astype(np.float32) - zero_point) * scale
    return y.copy()


def open_runner(path: str | Path, threads: int | None = None) -> Runner:
    """Load `path` in its runtime; `threads` is the CPU thread count (None: the runtime's choice for ONNX,
    all cores for the phone runtimes)."""
    fmt = format_of(path)
    kind = {"onnx": _OnnxRunner, "executorch": _ExecutorchRunner, "litert": _LiteRTRunner}.get(fmt)
    if kind is None:
        raise ValueError(f"{path}: {fmt} files do not run on {os.uname().sysname}")
    if fmt == "onnx":
        return kind(Path(path), threads)
    with quiet_native():  # "Created TensorFlow Lite XNNPACK delegate", "Resetting threadpool"
        return kind(Path(path), threads)
