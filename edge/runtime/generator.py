"""On-device text generation: tokenizer, chat template and a KV-cache decoding loop over ONNX Runtime.

No torch and no transformers: the tokenizer is the ``tokenizers`` library reading the bundle's
``tokenizer.json``, the chat template is rendered by :mod:`edge.runtime.chat`, and the decoder is
driven by the KV layout the manifest names (:mod:`edge.runtime.kv_cache`).

Context contract: prompt plus generated tokens never exceed ``max_context``. A prompt that leaves
no room for one new token is a :class:`~edge.errors.RequestError`; generation that reaches the end
of the context finishes with ``"length"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
from tokenizers import Tokenizer

from edge.errors import InferenceError, RequestError
from edge.protocol.manifest import Manifest
from edge.protocol.profile import DeviceProfile
from edge.runtime.chat import ChatTemplate, load_chat_template
from edge.runtime.kv_cache import make_decoder
from edge.runtime.model import NUMPY_DTYPES, LoadedModel
from edge.runtime.textstream import IncrementalDetokenizer, StopMatcher

TOKENIZER_FILE = "tokenizer.json"
# Candidates kept before the top-p sort: sorting a 150k vocabulary every token costs milliseconds,
# while the nucleus of a real distribution almost always lies in its few hundred largest logits.
TOP_P_CANDIDATES = 512

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class GenerationParams:
    """How to generate: length, sampling and stop strings. ``temperature`` 0 is greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            raise RequestError(f"temperature must be between 0 and 100, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise RequestError("stop must be a list of strings")


@dataclass(frozen=True)
class GenerationEvent:
    """One step of a generation: the token, the new text, and on the last event why it ended."""

    token_id: int | None
    text: str
    finish_reason: FinishReason | None = None


@dataclass
class _Sampler:
    params: GenerationParams
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / p.temperature
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if p.top_p >= 1.0:
            cum = np.cumsum(probs)
            return int(min(np.searchsorted(cum, self.rng.random() * cum[-1]), probs.size - 1))
        k = min(TOP_P_CANDIDATES, probs.size)
        cand = np.argpartition(probs, -k)[-k:] if k < probs.size else np.arange(probs.size)
        order = cand[np.argsort(-probs[cand], kind="stable")]
        cum = np.cumsum(probs[order])
        if cum[-1] < p.top_p and k < probs.size:  # the nucleus is wider than the candidates
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]
        kept = np.cumsum(probs[keep])
        return int(keep[min(int(np.searchsorted(kept, self.rng.random() * kept[-1])), keep.size - 1)])


class LLMModel(LoadedModel):
    """A decoder bundle: encode, render chat, generate with a KV cache, score teacher-forced."""

    def __init__(self, folder: Path, manifest: Manifest, profile: DeviceProfile | None = None,
                 threads: int | None = None) -> None:
        if manifest.llm is None:
            raise InferenceError(f"{manifest.ref} is a text-generation bundle without an llm section in its manifest")
        super().__init__(folder, manifest, profile, threads)
        self.spec = manifest.llm
        path = self.folder / TOKENIZER_FILE
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises bare Exceptions
            raise InferenceError(f"cannot load {path}: {exc}") from exc
        self.chat_template: ChatTemplate | None = load_chat_template(self.folder)
        outputs = {o.name: o for o in manifest.outputs}
        logits = outputs.get(self.spec.logits_name)
        if logits is None:
            raise InferenceError(f"{manifest.ref} has no output {self.spec.logits_name!r}")
        self.decoder = make_decoder(self.session, self.spec, NUMPY_DTYPES[logits.dtype],
                                    [i.name for i in manifest.inputs])
        self.eos_token_ids = frozenset(self.spec.eos_token_ids)

    @property
    def max_context(self) -> int:
        """Return the most tokens (prompt plus generated) one request may hold."""
        return self.spec.max_context

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Tokenize text; special-token text (e.g. ``<|im_start|>``) maps to its id.

        ``add_special_tokens`` is off by default because chat templates write BOS themselves.
        """
        if not isinstance(text, str):
            raise RequestError(f"text must be a string, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Turn token ids back into text."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's template into prompt text."""
        if self.chat_template is None:
            raise RequestError(f"{self.manifest.ref} has no chat template", hint="send a plain prompt instead")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def _check_ids(self, ids: Sequence[int], what: str) -> list[int]:
        try:
            out = [int(i) for i in ids]
        except (TypeError, ValueError) as exc:
            raise RequestError(f"{what} must be a list of token ids") from exc
        if not out:
            raise RequestError(f"{what} is empty")
        bad = [i for i in out if not 0 <= i < self.spec.vocab_size]
        if bad:
            raise RequestError(f"{what} has token id {bad[0]} outside the vocabulary of {self.spec.vocab_size}")
        return out

    def generate(self, prompt_ids: Sequence[int], params: GenerationParams | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[GenerationEvent]:
        """Generate from ``prompt_ids``, yielding one event per token; the last has a finish_reason.

        Checked before anything runs: an empty prompt, unknown ids, or a prompt that leaves no room
        in the context raise :class:`RequestError` here, not on the first ``next()``.
        """
        params = params or GenerationParams()
        ids = self._check_ids(prompt_ids, "prompt")
        if len(ids) >= self.max_context:
            raise RequestError(
                f"prompt is {len(ids)} tokens; the model's context is {self.max_context} tokens, "
                f"so no room is left to generate", hint="shorten the prompt or the conversation")
        budget = min(params.max_tokens, self.max_context - len(ids))
        return self._generate(ids, params, budget, should_stop)

    def _generate(self, ids: list[int], params: GenerationParams, budget: int,
                  should_stop: Callable[[], bool] | None) -> Iterator[GenerationEvent]:
        sample = _Sampler(params)
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(params.stop)
        cancelled = should_stop or (lambda: False)
        if cancelled():
            yield GenerationEvent(None, "", "cancelled")
            return
        # the last generated token is never fed back, so the cache holds at most len + budget - 1
        state = self.decoder.acquire(len(ids) + budget)
        try:
            logits = self.decoder.prefill(state, ids)
            for n in range(1, budget + 1):
                token = sample(logits)
                if token in self.eos_token_ids and not params.ignore_eos:
                    yield GenerationEvent(token, stops.feed(detok.flush())[0] + stops.flush(), "stop")
                    return
                text, hit = stops.feed(detok.add(token))
                if hit:
                    yield GenerationEvent(token, text, "stop")
                    return
                if n == budget:
                    tail, hit = stops.feed(detok.flush())
                    yield GenerationEvent(token, text + tail + ("" if hit else stops.flush()),
                                          "stop" if hit else "length")
                    return
                yield GenerationEvent(token, text)
                if cancelled():
                    yield GenerationEvent(None, stops.feed(detok.flush())[0] + stops.flush(), "cancelled")
                    return
                logits = self.decoder.step(state, token)
        finally:
            self.decoder.release(state)

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Return log-probabilities [len(ids), vocab]: row t is the distribution of token t + 1."""
        ids = self._check_ids(ids, "ids")
        if len(ids) > self.max_context:
            raise RequestError(f"{len(ids)} tokens exceed the model's context of {self.max_context}")
        logits = self.decoder.logits_for(ids).astype(np.float32, copy=False)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
