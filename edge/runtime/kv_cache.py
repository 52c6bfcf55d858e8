"""KV-cache layouts: how a decoder's past keys and values travel between ONNX Runtime runs.

The manifest's ``llm.kv_layout`` picks one; the generator only sees ``acquire / prefill / step /
release / logits_for``, so a faster layout is one new class here.

* ``shared-buffer`` (Edge's fused graph): one preallocated buffer per layer, bound with IO binding
  as both the past input and the present output, so GroupQueryAttention appends the new token in
  place. Per token only three tiny inputs change; they live in numpy arrays the binding reads
  from, so a step is one ``run_with_iobinding`` and an argmax.
* ``concat`` (optimum's export): the graph returns past + new as a new tensor each step; the
  outputs stay in ORT memory and are bound as the next step's inputs, with no numpy round trip.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from edge.errors import InferenceError
from edge.protocol.manifest import LLMSpec

# Prompt tokens per prefill run: attention scratch grows with the square of the chunk, so long
# prompts go in pieces; 512 keeps it under ~10 MB per head while still amortizing the weights.
PREFILL_CHUNK = 512
# Buffers kept for reuse between requests: one covers the usual one-request-at-a-time device.
MAX_IDLE_STATES = 1

_KV_DTYPES = {"float32": np.float32, "float16": np.float16}
# Providers whose KV buffers must live in GPU memory: a CPU buffer would be copied both ways on
# every token and would defeat the in-place append (the op compares past and present pointers).
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _kv_device(session: ort.InferenceSession) -> tuple[str, int]:
    providers = session.get_providers()
    if providers and providers[0] in _GPU_PROVIDERS:
        options = session.get_provider_options().get(providers[0], {})
        return "cuda", int(options.get("device_id", 0) or 0)
    return "cpu", 0


def _run(session: ort.InferenceSession, io: ort.IOBinding) -> None:
    try:
        session.run_with_iobinding(io)
    except Exception as exc:  # ORT's errors are untyped; translate once, here
        raise InferenceError(f"decoder step failed: {exc}") from exc


def _value(arr: np.ndarray) -> ort.OrtValue:
    # On CPU the OrtValue wraps the numpy memory: writing into ``arr`` changes the bound input.
    return ort.OrtValue.ortvalue_from_numpy(arr)


@dataclass
class SharedState:
    """One request's KV buffers and the small arrays bound as inputs."""

    capacity: int
    io: ort.IOBinding
    logits: np.ndarray  # [1, 1, vocab], written by every run
    token: np.ndarray  # [1, 1] int64
    index: np.ndarray  # [1] int64, always 0 while decoding
    seqlens: np.ndarray  # [1] int32: tokens in the cache after the run, minus one
    total: np.ndarray  # [] int32: tokens in the cache after the run
    keep: list[Any] = field(default_factory=list)  # arrays and OrtValues the binding points at
    token_refs: list[Any] = field(default_factory=list)  # what input_ids / logits_index point at now
    length: int = 0  # tokens in the cache


class SharedBufferDecoder:
    """Drive Edge's fused decoder: KV buffers bound in place, IO binding, preallocated inputs."""

    def __init__(self, session: ort.InferenceSession, spec: LLMSpec, logits_dtype: Any = np.float32,
                 prefill_chunk: int = PREFILL_CHUNK) -> None:
        if not (spec.seqlens_k_name and spec.total_sequence_length_name and spec.logits_index_name):
            raise InferenceError("a shared-buffer decoder needs seqlens_k, total_sequence_length and logits_index names")
        self.session = session
        self.spec = spec
        self.kv_dtype = _KV_DTYPES[spec.kv_dtype]
        self.logits_dtype = logits_dtype
        self.prefill_chunk = prefill_chunk
        self.device, self.device_id = _kv_device(session)
        self._idle: list[SharedState] = []
        self._lock = threading.Lock()

    def acquire(self, capacity: int) -> SharedState:
        """Return buffers for a request of up to ``capacity`` tokens (reused when one is idle)."""
        with self._lock:
            for i, state in enumerate(self._idle):
                if state.capacity >= capacity:
                    state = self._idle.pop(i)
                    state.length = 0
                    return state
        return self._new_state(capacity)

    def release(self, state: SharedState) -> None:
        """Keep a finished request's buffers for the next one."""
        with self._lock:
            self._idle.append(state)
            self._idle.sort(key=lambda s: -s.capacity)
            del self._idle[MAX_IDLE_STATES:]

    def _new_state(self, capacity: int) -> SharedState:
        s = self.spec
        io = self.session.io_binding()
        keep: list[Any] = []
        shape = (1, s.num_kv_heads, capacity, s.head_dim)
        for layer in range(s.num_layers):
            for past, present in ((s.past_key_name, s.present_key_name), (s.past_value_name, s.present_value_name)):
                if self.device == "cpu":
                    buf = _value(np.zeros(shape, dtype=self.kv_dtype))
                else:  # not zeroed: the op never reads past the tokens it was told are there
                    buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, self.device_id)
                keep.append(buf)
                io.bind_ortvalue_input(past.format(layer=layer), buf)
                io.bind_ortvalue_output(present.format(layer=layer), buf)
        state = SharedState(
            capacity=capacity, io=io, logits=np.zeros((1, 1, s.vocab_size), dtype=self.logits_dtype),
            token=np.zeros((1, 1), dtype=np.int64), index=np.zeros(1, dtype=np.int64),
            seqlens=np.zeros(1, dtype=np.int32), total=np.zeros((), dtype=np.int32), keep=keep,
        )
        for name, arr in ((s.seqlens_k_name, state.seqlens), (s.total_sequence_length_name, state.total)):
            value = _value(arr)
            keep.append(value)
            io.bind_ortvalue_input(name, value)
        logits = _value(state.logits)
        keep.append(logits)
        io.bind_ortvalue_output(s.logits_name, logits)
        return state

    def _bind_tokens(self, state: SharedState, ids: np.ndarray, index: np.ndarray) -> None:
        ids_v, index_v = _value(ids), _value(index)
        state.io.bind_ortvalue_input(self.spec.input_ids_name, ids_v)
        state.io.bind_ortvalue_input(self.spec.logits_index_name, index_v)
        state.token_refs = [ids, index, ids_v, index_v]

    def prefill(self, state: SharedState, ids: Sequence[int]) -> np.ndarray:
        """Feed the prompt (in chunks) and return the logits after its last token."""
        ids_arr = np.asarray(ids, dtype=np.int64)
        for start in range(0, len(ids_arr), self.prefill_chunk):
            chunk = np.ascontiguousarray(ids_arr[start:start + self.prefill_chunk][None, :])
            n = chunk.shape[1]
            self._bind_tokens(state, chunk, np.array([n - 1], dtype=np.int64))
            state.seqlens[0] = state.length + n - 1
            state.total[()] = state.length + n
            _run(self.session, state.io)
            state.length += n
        self._bind_tokens(state, state.token, state.index)
        return state.logits[0, 0]

    def step(self, state: SharedState, token: int) -> np.ndarray:
        """Feed one token and return the logits after it."""
        if state.length >= state.capacity:
            raise InferenceError(f"the KV cache is full ({state.capacity} tokens)")
        state.token[0, 0] = token
        state.seqlens[0] = state.length
        state.total[()] = state.length + 1
        _run(self.session, state.io)
        state.length += 1
        return state.logits[0, 0]

    def logits_for(self, ids: Sequence[int]) -> np.ndarray:
        """Return the logits at every position of ``ids`` ([len(ids), vocab]), teacher forced."""
        ids_arr = np.asarray(ids, dtype=np.int64)
        state = self._new_state(len(ids_arr))
        out = np.empty((len(ids_arr), self.spec.vocab_size), dtype=np.float32)
        for start in range(0, len(ids_arr), self.prefill_chunk):
            chunk = np.ascontiguousarray(ids_arr[start:start + self.prefill_chunk][None, :])
            n = chunk.shape[1]
            logits = np.empty((1, n, self.spec.vocab_size), dtype=self.logits_dtype)
            logits_v = _value(logits)
            self._bind_tokens(state, chunk, np.arange(n, dtype=np.int64))
            state.io.bind_ortvalue_output(self.spec.logits_name, logits_v)
            state.seqlens[0] = state.length + n - 1
            state.total[()] = state.length + n
            _run(self.session, state.io)
            out[start:start + n] = logits[0]
            state.length += n
        return out


@dataclass
class ConcatState:
    """One request's KV tensors, held in ORT memory between runs."""

    capacity: int
    io: ort.IOBinding
    length: int = 0
    keep: list[Any] = field(default_factory=list)


class ConcatDecoder:
    """Drive an optimum-style decoder whose present KV is past + new, returned as a new tensor."""

    def __init__(self, session: ort.InferenceSession, spec: LLMSpec, logits_dtype: Any = np.float32,
                 input_names: Sequence[str] = ()) -> None:
        self.session = session
        self.spec = spec
        self.kv_dtype = _KV_DTYPES[spec.kv_dtype]
        self.logits_dtype = logits_dtype
        names = set(input_names)
        self.has_mask = spec.attention_mask_name in names
        self.has_positions = spec.uses_position_ids and spec.position_ids_name in names
        self._kv_names = [
            (past.format(layer=i), present.format(layer=i))
            for i in range(spec.num_layers)
            for past, present in ((spec.past_key_name, spec.present_key_name), (spec.past_value_name, spec.present_value_name))
        ]

    def acquire(self, capacity: int) -> ConcatState:
        """Return an empty cache for a request."""
        io = self.session.io_binding()
        empty = np.zeros((1, self.spec.num_kv_heads, 0, self.spec.head_dim), dtype=self.kv_dtype)
        keep: list[Any] = [empty]
        for past, _ in self._kv_names:
            value = _value(empty)
            keep.append(value)
            io.bind_ortvalue_input(past, value)
        return ConcatState(capacity=capacity, io=io, keep=keep)

    def release(self, state: ConcatState) -> None:
        """Drop a finished request's cache."""
        state.io.clear_binding_inputs()
        state.io.clear_binding_outputs()

    def _run(self, state: ConcatState, ids: np.ndarray) -> np.ndarray:
        s, n = self.spec, ids.shape[1]
        io = state.io
        arrays = [ids]
        io.bind_cpu_input(s.input_ids_name, ids)
        if self.has_mask:
            mask = np.ones((1, state.length + n), dtype=np.int64)
            arrays.append(mask)
            io.bind_cpu_input(s.attention_mask_name, mask)
        if self.has_positions:
            pos = np.arange(state.length, state.length + n, dtype=np.int64)[None, :]
            arrays.append(pos)
            io.bind_cpu_input(s.position_ids_name, pos)
        io.bind_output(s.logits_name, "cpu")
        for _, present in self._kv_names:
            io.bind_output(present, "cpu")
        _run(self.session, io)
        outputs = io.get_outputs()
        logits = outputs[0].numpy()[0]
        for (past, _), value in zip(self._kv_names, outputs[1:]):
            io.bind_ortvalue_input(past, value)
        state.keep = [*arrays, *outputs[1:]]
        state.length += n
        return logits

    def prefill(self, state: ConcatState, ids: Sequence[int]) -> np.ndarray:
        """Feed the prompt and return the logits after its last token."""
        return self._run(state, np.asarray(ids, dtype=np.int64)[None, :])[-1]

    def step(self, state: ConcatState, token: int) -> np.ndarray:
        """Feed one token and return the logits after it."""
        return self._run(state, np.array([[token]], dtype=np.int64))[-1]

    def logits_for(self, ids: Sequence[int]) -> np.ndarray:
        """Return the logits at every position of ``ids`` ([len(ids), vocab]), teacher forced."""
        state = self.acquire(len(ids))
        try:
            return self._run(state, np.asarray(ids, dtype=np.int64)[None, :]).astype(np.float32)
        finally:
            self.release(state)


def make_decoder(session: ort.InferenceSession, spec: LLMSpec, logits_dtype: Any = np.float32,
                 input_names: Sequence[str] = ()) -> SharedBufferDecoder | ConcatDecoder:
    """Return the decoder driver for the manifest's KV layout."""
    if spec.kv_layout == "shared-buffer":
        return SharedBufferDecoder(session, spec, logits_dtype)
    if spec.kv_layout == "concat":
        return ConcatDecoder(session, spec, logits_dtype, input_names)
    raise InferenceError(f"unknown KV layout {spec.kv_layout!r}")
