"""Closed sets shared by the exporter, the agent and the fleet."""

from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    """Numeric precision of a compiled model's weights."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


class ModelKind(str, Enum):
    """Families of models that get their own precision plan and fidelity metric."""

    ENCODER = "encoder"  # sentence embeddings and text classification
    LLM = "llm"  # decoder-only text generation with a KV cache
    GENERIC = "generic"  # a bring-your-own ONNX file (vision and others)


class Task(str, Enum):
    """What a bundle's model does; selects pre/post-processing and the fidelity metric."""

    FEATURE_EXTRACTION = "feature-extraction"
    TEXT_CLASSIFICATION = "text-classification"
    TEXT_GENERATION = "text-generation"
    GENERIC = "generic"

    @property
    def kind(self) -> ModelKind:
        """Return the model kind whose precision plan applies to this task."""
        if self is Task.TEXT_GENERATION:
            return ModelKind.LLM
        if self is Task.GENERIC:
            return ModelKind.GENERIC
        return ModelKind.ENCODER


class Architecture(str, Enum):
    """CPU architecture as ``platform.machine()`` reports it on Linux."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"
    ANY = "any"  # portable profiles (generic-cpu) that run on either

    def accepts(self, machine: str) -> bool:
        """Return whether a machine reporting ``machine`` (platform.machine()) fits."""
        machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())
        return self is Architecture.ANY or self.value == machine


class Accelerator(str, Enum):
    """Accelerator a profile relies on."""

    NONE = "none"
    CUDA = "cuda"


class ExecutionProvider(str, Enum):
    """ONNX Runtime execution providers a profile may name (spelled as ORT spells them)."""

    TENSORRT = "TensorrtExecutionProvider"
    CUDA = "CUDAExecutionProvider"
    OPENVINO = "OpenVINOExecutionProvider"
    DNNL = "DnnlExecutionProvider"
    XNNPACK = "XnnpackExecutionProvider"
    CPU = "CPUExecutionProvider"

    @property
    def needs_gpu(self) -> bool:
        """Return whether this provider runs on an NVIDIA GPU."""
        return self in (ExecutionProvider.TENSORRT, ExecutionProvider.CUDA)


# ONNX Runtime's provider option keys, verbatim, so a typo in a profile is caught at load time
# instead of being silently ignored by ORT.
PROVIDER_OPTION_KEYS: dict[ExecutionProvider, frozenset[str]] = {
    ExecutionProvider.TENSORRT: frozenset(
        {
            "device_id",
            "trt_max_workspace_size",
            "trt_fp16_enable",
            "trt_int8_enable",
            "trt_engine_cache_enable",
            "trt_engine_cache_path",
            "trt_timing_cache_enable",
            "trt_builder_optimization_level",
            "trt_max_partition_iterations",
            "trt_min_subgraph_size",
            "trt_dla_enable",
            "trt_dla_core",
            "trt_layer_norm_fp32_fallback",
            "trt_cuda_graph_enable",
        }
    ),
    ExecutionProvider.CUDA: frozenset(
        {
            "device_id",
            "gpu_mem_limit",
            "arena_extend_strategy",
            "cudnn_conv_algo_search",
            "do_copy_in_default_stream",
            "cudnn_conv_use_max_workspace",
            "enable_cuda_graph",
            "use_tf32",
            "prefer_nhwc",
        }
    ),
    ExecutionProvider.OPENVINO: frozenset(
        {"device_type", "precision", "num_of_threads", "cache_dir", "enable_opencl_throttling"}
    ),
    ExecutionProvider.DNNL: frozenset({"use_arena"}),
    ExecutionProvider.XNNPACK: frozenset({"intra_op_num_threads"}),
    ExecutionProvider.CPU: frozenset(),
}
