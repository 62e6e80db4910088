"""Inference backends: what runs an ONNX model's graph, and on which device.

One small interface, :class:`InferenceBackend` (``run`` a batch, ``close``, the input's name and
shape, the outputs' shapes), and one class per engine, picked from :data:`BACKENDS` by
``vision.backend`` (and ``vision.provider`` for the device):

- ``onnxruntime``: ONNX Runtime, on the CPU (the default) or through its CUDA execution
  provider where onnxruntime-gpu is installed.
- ``torch``: the ONNX graph converted to a PyTorch module with onnx2torch and run by PyTorch,
  on an NVIDIA GPU (or the CPU), for boxes that have PyTorch with CUDA but no onnxruntime-gpu.
  Batches go to the GPU through a reused pinned host buffer; ``half`` runs it in fp16.

Every backend takes a float32 batch ``(N, ...)`` and returns float32 ``(N, ...)`` outputs in
the graph's order. PyTorch, onnx and onnx2torch are imported only when the torch backend is
chosen: the project runs without them.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import threadpoolctl

from edgecam.errors import ModelError

if TYPE_CHECKING:
    from edgecam.config import VisionConfig

__all__ = [
    "BACKENDS",
    "BackendName",
    "DeviceName",
    "InferenceBackend",
    "OnnxRuntimeBackend",
    "Runtime",
    "TorchBackend",
    "batch_dim",
    "one_blas_thread",
    "open_backend",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
# A model dimension as the graph declares it: a size, a symbolic name, or unknown.
Dim = int | str | None

BackendName = Literal["onnxruntime", "torch"]
DeviceName = Literal["cpu", "cuda"]

_INSTALL_TORCH = (
    "install PyTorch (with CUDA for a GPU), onnx and onnx2torch, e.g. pip install "
    "'edgecam[gpu]' (the onnx2torch wheel also lies in third_party/wheels/), or set "
    "vision.backend to 'onnxruntime'"
)


@dataclass(frozen=True)
class Runtime:
    """Which engine runs the models and where: ``vision.backend``, ``vision.provider`` and
    ``vision.half`` of the config."""

    backend: BackendName = "onnxruntime"
    device: DeviceName = "cpu"
    half: bool = False

    def __post_init__(self) -> None:
        if self.backend not in get_args(BackendName):
            raise ValueError(
                f"backend must be one of {get_args(BackendName)}, got {self.backend!r}"
            )
        if self.device not in get_args(DeviceName):
            raise ValueError(f"device must be one of {get_args(DeviceName)}, got {self.device!r}")
        if self.half and (self.backend, self.device) != ("torch", "cuda"):
            raise ValueError("half precision needs backend 'torch' on device 'cuda'")

    @classmethod
    def of(cls, vision: VisionConfig) -> Runtime:
        return cls(vision.backend, vision.provider, vision.half)

    @classmethod
    def parse(cls, provider: str | Runtime) -> Runtime:
        """``provider`` as the detectors take it: a Runtime, or a device name for ONNX Runtime
        (``"cpu"`` / ``"cuda"``, as before backends were a choice)."""
        if isinstance(provider, Runtime):
            return provider
        if provider not in get_args(DeviceName):
            raise ValueError(f"provider must be 'cpu' or 'cuda', got {provider!r}")
        return cls("onnxruntime", provider)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.backend} {self.device}{' fp16' if self.half else ''}"


class InferenceBackend(Protocol):
    """One loaded ONNX graph with a single input, on one device."""

    input_count: int  # edgecam's models have one; the first is the one run() feeds
    input_name: str
    input_type: str  # ONNX type string, e.g. "tensor(float)"
    input_shape: list[Dim]
    output_shapes: list[list[Dim]]
    description: str  # for logs: the engine and device that actually run it

    def run(self, batch: FloatArray) -> list[FloatArray]:
        """The graph's outputs for ``batch`` (N, ...), each (N, ...) float32, in graph order."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# ONNX Runtime

_ORT_PROVIDERS: dict[DeviceName, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRuntimeBackend:
    """An ONNX Runtime session, sequential, ``threads`` intra-op threads that never spin."""

    def __init__(self, path: Path, device: DeviceName, threads: int) -> None:
        providers = _ORT_PROVIDERS[device]
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise ModelError(
                f"provider '{device}' requested but ONNX Runtime has no {missing[0]} "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu, "
                "set vision.backend to 'torch' (PyTorch with CUDA), or set vision.provider "
                "to 'cpu'"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # The pool's threads share the two cores with decoding and x264: spinning while idle
        # only takes CPU from them (edgecam process on the 720p clip: 70 -> 85-88 fps).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self._session: ort.InferenceSession | None = session
        inputs, outputs = session.get_inputs(), session.get_outputs()
        self.input_count = len(inputs)
        self.input_name: str = inputs[0].name
        self.input_type: str = inputs[0].type
        self.input_shape: list[Dim] = list(inputs[0].shape)
        self.output_shapes: list[list[Dim]] = [list(o.shape) for o in outputs]
        self.description = f"onnxruntime {session.get_providers()[0]}, {threads} threads"

    def run(self, batch: FloatArray) -> list[FloatArray]:
        if self._session is None:
            raise RuntimeError("the ONNX Runtime session is closed")
        outputs: list[FloatArray] = self._session.run(None, {self.input_name: batch})
        return outputs

    def close(self) -> None:
        self._session = None


# ---------------------------------------------------------------------------------------------
# PyTorch (onnx2torch)


def _import_torch() -> tuple[Any, Any, Any]:
    """torch, onnx and onnx2torch.convert, or a ModelError that says what to install."""
    try:
        import onnx
        import torch
        from onnx2torch import convert
    except ImportError as exc:
        raise ModelError(
            f"vision.backend 'torch' cannot import {exc.name}: {_INSTALL_TORCH}"
        ) from exc
    return torch, onnx, convert


def _onnx_dims(value_info: Any) -> list[Dim]:
    dims: list[Dim] = []
    for d in value_info.type.tensor_type.shape.dim:
        kind = d.WhichOneof("value")
        dims.append(d.dim_value if kind == "dim_value" else d.dim_param if kind else None)
    return dims


# onnx2torch modules that read every argument after the data on the host (.tolist(), bool()):
# shape constants. Kept in host memory they cost no GPU -> host sync at each call (NanoDet has
# about 40), and the module can be captured as a CUDA graph.
_HOST_ARGUMENTS = {"OnnxReshape", "OnnxPadDynamic", "OnnxResize", "OnnxResizeV10", "OnnxSplit13"}


def _shape_constants_to_host(module: Any) -> int:
    """Move the initializers that are only ever shape arguments back to host memory; how many."""
    moved = 0
    for node in module.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        host_only = all(
            user.op == "call_module"
            and type(module.get_submodule(user.target)).__name__ in _HOST_ARGUMENTS
            and node not in user.args[:1]
            and node not in user.kwargs.values()
            for user in node.users
        )
        owner_path, _, name = node.target.rpartition(".")
        owner = module.get_submodule(owner_path)
        if host_only and name in owner._buffers:
            owner._buffers[name] = owner._buffers[name].cpu()
            moved += 1
    return moved


# ONNX TensorProto element types that a float model input can have (1 = FLOAT).
_ONNX_TYPES = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)"}


class TorchBackend:
    """The ONNX graph as a PyTorch module (onnx2torch), on ``device``, fp32 or fp16.

    Host batches go to the GPU through one pinned buffer, reused while it is large enough, and
    an asynchronous copy; outputs come back as float32 numpy arrays. :meth:`run_tensor` takes
    a tensor already on the device (for preprocessing done on the GPU).

    On a GPU, fp32 means fp32: TensorFloat-32 is turned off for convolutions and matrix
    products (process-wide), so that the GPU gives the CPU backend's boxes; fp16 is the fast
    option. With ``graphs`` each batch shape is captured once as a CUDA graph and replayed
    (one launch instead of one per layer: batch 1 is launch-bound); a graph that cannot be
    captured falls back to running the module. ``channels_last`` stores 4-D activations NHWC.
    """

    def __init__(
        self,
        path: Path,
        device: DeviceName,
        threads: int,
        half: bool = False,
        *,
        graphs: bool = True,
        channels_last: bool = False,
    ) -> None:
        torch, onnx, convert = _import_torch()
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelError(
                f"vision.provider 'cuda' with vision.backend 'torch' but PyTorch "
                f"{torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda}); "
                "check the NVIDIA driver, install a CUDA build of PyTorch, or set "
                "vision.provider to 'cpu'"
            )
        if half and device != "cuda":
            raise ValueError("half precision needs device 'cuda'")
        self._torch = torch
        model = onnx.load(str(path))
        weights = {i.name for i in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in weights]
        self.input_count = len(inputs)
        self.input_name = inputs[0].name
        elem = inputs[0].type.tensor_type.elem_type
        self.input_type = _ONNX_TYPES.get(elem, f"tensor(type {elem})")
        self.input_shape = _onnx_dims(inputs[0])
        self.output_shapes = [_onnx_dims(o) for o in model.graph.output]
        self._device = torch.device(device)
        self.dtype = torch.float16 if half else torch.float32
        module = convert(model).eval().to(self._device)
        self._channels_last = channels_last and len(self.input_shape) == 4
        if self._channels_last:
            module = module.to(memory_format=torch.channels_last)
        self._module: Any = module.half() if half else module
        host_constants = _shape_constants_to_host(self._module)
        cuda = device == "cuda"
        if cuda:
            # Fixed input sizes: let cuDNN pick the fastest convolution for each.
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        else:
            torch.set_num_threads(threads)
        self._pinned = cuda
        self._host: Any = None  # pinned staging buffer, grown on demand
        self._lock = threading.Lock()  # one batch at a time through the buffer and graphs
        self._graphs: dict[tuple[int, ...], Any] | None = {} if cuda and graphs else None
        self._pool: Any = torch.cuda.graph_pool_handle() if self._graphs is not None else None
        self.description = (
            f"torch {torch.__version__} {self._device} {'fp16' if half else 'fp32'}"
            f"{', CUDA graphs' if self._graphs is not None else ''}"
            f"{', channels-last' if self._channels_last else ''}"
            f", {host_constants} shape constants in host memory"
        )

    def _stage(self, batch: FloatArray) -> Any:
        """``batch`` on the device: through the pinned buffer for a GPU, as is on the CPU."""
        torch = self._torch
        source = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if not self._pinned:
            return source
        if self._host is None or self._host.numel() < source.numel():
            self._host = torch.empty(source.numel(), dtype=torch.float32, pin_memory=True)
        host = self._host[: source.numel()].view(source.shape)
        host.copy_(source)
        return host.to(self._device, non_blocking=True)

    def _prepare(self, x: Any) -> Any:
        x = x.to(self.dtype)
        if self._channels_last:
            x = x.contiguous(memory_format=self._torch.channels_last)
        return x

    def _call(self, x: Any) -> list[Any]:
        out = self._module(x)
        return list(out) if isinstance(out, list | tuple) else [out]

    def _capture(self, x: Any) -> Any:
        """(static input, graph, static outputs) for x's shape, or None where capture fails."""
        torch = self._torch
        static = x.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up (cuDNN's choice, lazy inits) outside the graph
                    self._call(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self._call(static)
        except Exception as exc:  # capture refuses host syncs, CPU tensors and the like
            log.warning(
                "CUDA graph capture failed for input %s (%s); running eagerly", x.shape, exc
            )
            return None
        return static, graph, outputs

    def run_tensor(self, x: Any) -> list[Any]:
        """Outputs (device tensors, the module's dtype) for ``x``, a tensor on the device.

        With CUDA graphs the outputs are the graph's own buffers, overwritten by the next call
        of the same shape: copy them before calling again.
        """
        if self._module is None:
            raise RuntimeError("the PyTorch module is closed")
        with self._torch.inference_mode():
            x = self._prepare(x)
            if self._graphs is None:
                return self._call(x)
            key = tuple(x.shape)
            if key not in self._graphs:
                self._graphs[key] = self._capture(x)
            captured = self._graphs[key]
            if captured is None:
                return self._call(x)
            static, graph, outputs = captured
            static.copy_(x)
            graph.replay()
            return list(outputs)

    def run(self, batch: FloatArray) -> list[FloatArray]:
        with self._lock:
            outputs = self.run_tensor(self._stage(batch))
            # .cpu() waits for the GPU, so the staging buffer is free again on return.
            return [o.float().cpu().numpy() for o in outputs]

    def close(self) -> None:
        self._module = None
        self._host = None
        self._graphs = None


# ---------------------------------------------------------------------------------------------
# Choosing by config


def _onnxruntime(path: Path, runtime: Runtime, threads: int) -> InferenceBackend:
    return OnnxRuntimeBackend(path, runtime.device, threads)


def _torch(path: Path, runtime: Runtime, threads: int) -> InferenceBackend:
    return TorchBackend(path, runtime.device, threads, runtime.half)


BACKENDS: dict[BackendName, Callable[[Path, Runtime, int], InferenceBackend]] = {
    "onnxruntime": _onnxruntime,
    "torch": _torch,
}


def open_backend(path: str | Path, runtime: Runtime, threads: int) -> InferenceBackend:
    """``path`` loaded by the engine of ``runtime``. Raises ModelError when the engine or the
    device is missing (naming what to install or set); the engine's own error when the file
    cannot be loaded."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    one_blas_thread()
    return BACKENDS[runtime.backend](Path(path), runtime, threads)


@functools.cache
def one_blas_thread() -> None:
    """numpy's BLAS (OpenBLAS) on one thread, for the whole process, from the first model on.

    The detectors call it for small products (the face crops' bilinear resize, the box
    decoding) ten times a second; after every call OpenBLAS's pool threads spin waiting for
    the next, which on the face-rich scene kept a core about half busy doing nothing (0.45 of
    the 2 cores). Set at run time, so it holds whoever imported numpy first.
    """
    threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def batch_dim(shape: Sequence[Dim]) -> int | None:
    """The fixed batch size of a model input shape, or None when any batch is accepted."""
    first = shape[0] if shape else None
    return first if isinstance(first, int) and first > 0 else None
