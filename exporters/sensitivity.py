"""Which nodes to keep in float when int8 fails the fidelity gate, and the search that uses it.

Plain dynamic int8 treats every weight alike, but the error it adds is far from uniform: on
all-MiniLM-L6-v2 a handful of the 36 MatMuls (the first layer's attention output, the FFN output
projections) cause most of the embedding drift, and a layer's *local* error is a poor guide to
its effect on the pooled output. So sensitivity is measured end to end:

:class:`SensitivityProbe` builds one fp32 model in which each candidate node can be switched,
by a boolean input, to a fake-quantized twin (int8 weights rounded as onnxruntime rounds them,
activations through ``DynamicQuantizeLinear -> DequantizeLinear``, exactly the run-time path).
Running it once per node and sample gives each node's own effect on the model's output,
without writing one quantized model per node. The per-node losses add up (closely, measured
on MiniLM) to the loss of the fully quantized model, which lets :func:`int8_search` choose how
many of the worst nodes to exclude from the gate's shortfall instead of guessing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge.errors import ExportError
from edge.protocol.profile import Int8Settings

from exporters.handler import Candidate, Feedback
from exporters.quantize import model_bytes, weight_nodes

log = logging.getLogger(__name__)

# Above this many weight bytes the probe (which keeps fp32 and fake-quantized copies of every
# weight in memory) costs more than it saves; the search falls back to a structural order.
PROBE_MAX_BYTES = 1 << 30
# Excluding more than this share of the weight nodes leaves int8 with little speed or size gain;
# the profile's fallback precision is the better answer then.
MAX_EXCLUDED_SHARE = 0.5
# The per-node losses are an additive estimate; aim this much past the shortfall so the next
# candidate usually passes instead of landing just short.
SEARCH_MARGIN = 1.3
# Candidates the node-exclusion search may try before giving up on int8.
MAX_SEARCH_STEPS = 5
SWITCH_PREFIX = "edge_probe_"


def _channel_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return -1  # MatMul B [.., K, N]: one scale per output column


def _quantize_weight(w: np.ndarray, axis: int | None, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return (int8 weight, scale) as onnxruntime's symmetric QInt8 weight quantization does."""
    qmax = 64 if reduce_range else 127
    if axis is None:
        absmax = np.abs(w).max(keepdims=True)
    else:
        axes = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        absmax = np.abs(w).max(axis=axes, keepdims=True)
    scale = (absmax.astype(np.float64) / qmax).astype(np.float32)
    scale[scale == 0] = 1.0
    return np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8), scale


def _integer_matmul(proto: onnx.ModelProto, node: onnx.NodeProto, i: int, switch: str, weight: np.ndarray,
                    per_channel: bool, reduce_range: bool) -> list[onnx.NodeProto]:
    q, scale = _quantize_weight(weight, -1 if per_channel else None, reduce_range)
    scale = scale.reshape(-1)
    p, out = f"{node.name}__probe{i}", node.output[0]
    proto.graph.initializer.extend([
        numpy_helper.from_array(q, f"{p}_wq"),
        numpy_helper.from_array(scale, f"{p}_ws"),
        numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{p}_wz"),
    ])
    node.output[0] = f"{p}_fp"
    return [
        helper.make_node("DynamicQuantizeLinear", [node.input[0]], [f"{p}_xq", f"{p}_xs", f"{p}_xz"]),
        helper.make_node("MatMulInteger", [f"{p}_xq", f"{p}_wq", f"{p}_xz", f"{p}_wz"], [f"{p}_i32"]),
        helper.make_node("Cast", [f"{p}_i32"], [f"{p}_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}_xs", f"{p}_ws"], [f"{p}_s"]),
        helper.make_node("Mul", [f"{p}_f", f"{p}_s"], [f"{p}_q"]),
        helper.make_node("Where", [switch, f"{p}_q", f"{p}_fp"], [out]),
    ]


def _simulated(proto: onnx.ModelProto, node: onnx.NodeProto, i: int, switch: str, weight: np.ndarray,
               per_channel: bool, reduce_range: bool) -> list[onnx.NodeProto]:
    q, scale = _quantize_weight(weight, _channel_axis(node) if per_channel else None, reduce_range)
    p, x, w_name = f"{node.name}__probe{i}", node.input[0], node.input[1]
    proto.graph.initializer.append(numpy_helper.from_array((q.astype(np.float32) * scale), f"{p}_wfq"))
    node.input[0], node.input[1] = f"{p}_x", f"{p}_w"
    return [
        helper.make_node("DynamicQuantizeLinear", [x], [f"{p}_q", f"{p}_s", f"{p}_z"]),
        helper.make_node("DequantizeLinear", [f"{p}_q", f"{p}_s", f"{p}_z"], [f"{p}_dq"]),
        helper.make_node("Where", [switch, f"{p}_dq", x], [f"{p}_x"]),
        helper.make_node("Where", [switch, f"{p}_wfq", w_name], [f"{p}_w"]),
    ]


class SensitivityProbe:
    """An fp32 model whose weight nodes can each be switched to int8 arithmetic.

    MatMul nodes switch to the very kernels dynamic int8 runs (``DynamicQuantizeLinear`` then
    ``MatMulInteger`` with the int8 weight, rescaled), so the probe sees what the build machine's
    CPU really computes, including the int16 saturation of u8s8 kernels on CPUs without VNNI,
    which a float simulation misses. Other weight ops (Conv, Gemm) switch to a float simulation.
    """

    def __init__(self, model: Path, nodes: list[str], *, per_channel: bool, reduce_range: bool,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        from edge.runtime.session import session_options

        proto = onnx.load(str(model))
        inits = {i.name: i for i in proto.graph.initializer}
        by_name = {n.name: n for n in proto.graph.node}
        self.nodes = [n for n in nodes if n in by_name]
        added: list[onnx.NodeProto] = []
        for i, name in enumerate(self.nodes):
            node = by_name[name]
            switch = f"{SWITCH_PREFIX}{i}"
            proto.graph.input.append(helper.make_tensor_value_info(switch, onnx.TensorProto.BOOL, []))
            weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            if node.op_type == "MatMul" and weight.ndim == 2:
                added += _integer_matmul(proto, node, i, switch, weight, per_channel, reduce_range)
            else:
                added += _simulated(proto, node, i, switch, weight, per_channel, reduce_range)
        ordered = _toposort([*proto.graph.node, *added], proto)
        del proto.graph.node[:]
        proto.graph.node.extend(ordered)
        so = session_options(threads)
        try:
            self.session = ort.InferenceSession(_serialize(proto), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's errors are untyped
            raise ExportError(f"cannot build the int8 sensitivity probe for {model}: {exc}") from exc
        self._off = {f"{SWITCH_PREFIX}{i}": np.array(False) for i in range(len(self.nodes))}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray], node: int | None = None) -> list[np.ndarray]:
        """Run one sample with node ``node`` (index into ``nodes``) in int8, or none."""
        switches = dict(self._off)
        if node is not None:
            switches[f"{SWITCH_PREFIX}{node}"] = np.array(True)
        return self.session.run(None, {**feed, **switches})

    def rank(self, feeds: list[dict[str, np.ndarray]], loss: Callable[[int, list[np.ndarray]], float]) -> list[tuple[str, float]]:
        """Return (node, mean loss over ``feeds``) for every node, most harmful first.

        ``loss(sample_index, outputs)`` scores the outputs of one sample, 0 for a perfect match.
        """
        scores = []
        for i, name in enumerate(self.nodes):
            total = sum(loss(j, self.run(feed, i)) for j, feed in enumerate(feeds))
            scores.append((name, float(total) / max(len(feeds), 1)))
        return sorted(scores, key=lambda item: -item[1])


def _serialize(proto: onnx.ModelProto) -> bytes:
    try:
        return proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GiB limit
        raise ExportError(f"model too large for the sensitivity probe: {exc}") from exc


def _toposort(nodes: list[onnx.NodeProto], proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    available = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer} | {""}
    pending, out = list(nodes), []
    while pending:
        progressed, rest = False, []
        for node in pending:
            if all(i in available for i in node.input):
                out.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:  # inputs from subgraph scopes or unknown: keep the original order
            return out + rest
        pending = rest
    return out


def structural_order(nodes: list[str]) -> list[tuple[str, float]]:
    """Rank nodes without measuring: first and last layers first, then inwards (a common rule)."""
    order, lo, hi = [], 0, len(nodes) - 1
    while lo <= hi:
        order.append(nodes[lo])
        if hi != lo:
            order.append(nodes[hi])
        lo, hi = lo + 1, hi - 1
    n = len(order)
    return [(name, float(n - i)) for i, name in enumerate(order)]


def can_probe(model: Path) -> bool:
    """Return whether a model is small enough for the end-to-end sensitivity probe."""
    return model_bytes(model) <= PROBE_MAX_BYTES


def _shortfall_share(metrics: dict[str, float], thresholds: dict[str, tuple[str, float]]) -> float:
    """Return the share of the current loss (1 - metric) that must go for every bound to pass."""
    share = 0.0
    for name, (op, bound) in thresholds.items():
        value = metrics.get(name)
        if value is None or op != ">=" or value >= bound:
            continue
        loss, allowed = 1.0 - value, 1.0 - bound
        if loss > 0:
            share = max(share, 1.0 - allowed / loss)
    return min(1.0, share * SEARCH_MARGIN)


def next_exclusions(ranking: list[tuple[str, float]], excluded: list[str], share: float, limit: int) -> list[str]:
    """Return ``excluded`` grown by the most harmful nodes whose loss covers ``share`` of what remains."""
    remaining = [(n, s) for n, s in ranking if n not in excluded]
    total = sum(max(s, 0.0) for _, s in remaining)
    chosen, acc = [], 0.0
    for name, score in remaining:
        if len(excluded) + len(chosen) >= limit:
            break
        chosen.append(name)
        acc += max(score, 0.0)
        if total <= 0 or acc / total >= share:
            break
    return excluded + chosen


@dataclass
class Int8Step:
    """One int8 configuration to try."""

    method: str  # "dynamic" or "static"
    per_channel: bool
    reduce_range: bool
    exclude_op_types: tuple[str, ...]
    excluded_nodes: tuple[str, ...] = ()
    reason: str = "profile settings"

    def record(self) -> dict[str, Any]:
        """Return the JSON-able settings for the manifest's provenance."""
        return {
            "method": self.method, "weight_type": "QInt8", "per_channel": self.per_channel,
            "reduce_range": self.reduce_range, "exclude_op_types": list(self.exclude_op_types),
            "excluded_nodes": list(self.excluded_nodes), "search": self.reason,
        }


def int8_search(
    settings: Int8Settings,
    thresholds: dict[str, tuple[str, float]],
    build: Callable[[Int8Step], Candidate],
    rank: Callable[[Int8Step], list[tuple[str, float]]],
    methods: Iterable[str] = ("dynamic",),
    candidate_nodes: Iterable[str] = (),
) -> Generator[Candidate, Feedback, None]:
    """Yield int8 candidates until one passes: the profile's settings, per-channel, then exclusions.

    ``build`` quantizes one step into a candidate; ``rank`` returns the nodes, most harmful
    first, for the settings of the last step (called once, only if exclusions are needed).
    Each failed candidate's metrics decide how many more nodes the next one keeps in float.
    """
    steps = [Int8Step(m, settings.per_channel, settings.reduce_range, tuple(settings.exclude_op_types),
                      reason="profile settings" if i == 0 else f"{m} quantization")
             for i, m in enumerate(methods)]
    if not settings.per_channel:
        last = steps[-1]
        steps.append(Int8Step(last.method, True, last.reduce_range, last.exclude_op_types, reason="per-channel weights"))
    metrics: dict[str, float] = {}
    step = steps[0]
    for step in steps:
        metrics, passed = yield build(step)
        if passed:  # pragma: no cover - the pipeline stops sending once a candidate passes
            return
    if not settings.search_excluded_nodes:
        return
    nodes = list(candidate_nodes)
    limit = int(len(nodes) * MAX_EXCLUDED_SHARE)
    if limit < 1:
        return
    ranking = rank(step)
    log.info("int8 sensitivity (most harmful first): %s", ", ".join(f"{n} {s:.2e}" for n, s in ranking[:8]))
    excluded: list[str] = []
    for _ in range(MAX_SEARCH_STEPS):
        grown = next_exclusions(ranking, excluded, _shortfall_share(metrics, thresholds), limit)
        if len(grown) == len(excluded):
            return
        excluded = grown
        trial = Int8Step(step.method, step.per_channel, step.reduce_range, step.exclude_op_types,
                         tuple(excluded), reason=f"kept the {len(excluded)} most sensitive nodes in float")
        metrics, passed = yield build(trial)
        if passed:  # pragma: no cover
            return


def probe_nodes(model: Path, op_types: Iterable[str]) -> list[str]:
    """Return the nodes int8 quantization would touch and the probe can switch."""
    return weight_nodes(model, op_types)
