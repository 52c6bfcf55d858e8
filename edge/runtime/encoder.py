"""Encoders on the device: sentence embeddings and text classification from a bundle.

Embeddings are pooled and normalized exactly as sentence-transformers does (``manifest.pooling``):
mean over the attention mask, the first (CLS) token, the max over real tokens, or the last real
token; then L2-normalized when the model ends with a Normalize module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import InferenceError, RequestError
from edge.protocol.enums import Task
from edge.protocol.manifest import Manifest, Pooling
from edge.protocol.profile import DeviceProfile
from edge.runtime.model import LoadedModel
from edge.runtime.tokenizer import TextTokenizer

# Texts per ORT run: large enough for the matrix kernels to be efficient, small enough that one
# long text does not pad hundreds of short ones to its length (texts are sorted by length first).
DEFAULT_BATCH_SIZE = 32
# sentence-transformers' clamp on the token count and torch.nn.functional.normalize's epsilon.
_MIN_COUNT, _NORM_EPS = 1e-9, 1e-12


def pool(hidden: np.ndarray, mask: np.ndarray, spec: Pooling) -> np.ndarray:
    """Pool token embeddings [n, seq, dim] into sentence embeddings [n, dim], float32.

    ``mask`` is the int64 attention mask [n, seq]; padding is on the right.
    """
    hidden = hidden.astype(np.float32, copy=False)
    if spec.mode == "mean":
        maskf = mask.astype(np.float32)
        # [n, 1, seq] @ [n, seq, dim]: one batched GEMV instead of a masked copy of ``hidden``.
        out = np.matmul(maskf[:, None, :], hidden)[:, 0, :]
        out /= np.maximum(maskf.sum(axis=1, keepdims=True), _MIN_COUNT)
    elif spec.mode == "cls":
        out = hidden[np.arange(hidden.shape[0]), mask.argmax(axis=1)].copy()
    elif spec.mode == "max":
        out = np.where(mask[:, :, None].astype(bool), hidden, -np.inf).max(axis=1).astype(np.float32)
    elif spec.mode == "lasttoken":
        last = hidden.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
        out = hidden[np.arange(hidden.shape[0]), last] * mask[np.arange(mask.shape[0]), last, None]
        out = out.astype(np.float32)
    else:  # pragma: no cover - the manifest's Literal refuses other modes
        raise InferenceError(f"unknown pooling mode {spec.mode!r}")
    if spec.normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), _NORM_EPS)
    return out


class EncoderModel(LoadedModel):
    """A feature-extraction or text-classification bundle: texts in, embeddings or logits out."""

    def __init__(self, folder: Path, manifest: Manifest, profile: DeviceProfile | None = None,
                 threads: int | None = None) -> None:
        super().__init__(folder, manifest, profile, threads)
        self.tokenizer = TextTokenizer.from_folder(self.folder)
        names = {i.name for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - names
        if missing:
            raise InferenceError(f"{manifest.ref}: model lacks input(s) {', '.join(sorted(missing))}")
        self._token_types = "token_type_ids" in names
        if manifest.task is Task.FEATURE_EXTRACTION:
            self._pooling = manifest.pooling or Pooling()
            self._output = self._pooling.output
        else:
            self._pooling = None
            self._output = "logits"
        outputs = {o.name: o for o in manifest.outputs}
        if self._output not in outputs:
            raise InferenceError(f"{manifest.ref}: model has no output {self._output!r}; it has {', '.join(outputs)}")
        self._out_names = [self._output]
        self._width = outputs[self._output].shape[-1]

    @property
    def max_length(self) -> int:
        """Return the token limit; longer texts are truncated to it."""
        return self.tokenizer.max_length

    @property
    def labels(self) -> tuple[str, ...]:
        """Return the class labels of a classifier, in logit order (empty for embedders)."""
        return self.manifest.classifier.labels if self.manifest.classifier else ()

    @property
    def dimension(self) -> int | None:
        """Return the embedding or logit width, when the model declares it."""
        return self._width if isinstance(self._width, int) else None

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Return each text's token count (special tokens included, before truncation)."""
        return self.tokenizer.count(texts)

    def _run(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        batch = self.tokenizer.encode(texts, token_types=self._token_types)
        feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if batch.token_type_ids is not None:
            feed["token_type_ids"] = batch.token_type_ids
        try:
            out = self.session.run(self._out_names, feed)[0]
        except Exception as exc:  # ORT's errors are untyped; translate once, here
            raise InferenceError(f"{self.manifest.ref}: inference failed: {exc}") from exc
        return out, batch.attention_mask

    def _batched(self, texts: list[str], batch_size: int, step) -> np.ndarray:
        if not isinstance(texts, (list, tuple)):
            raise RequestError("texts must be a list of strings")
        if batch_size < 1:
            raise RequestError("batch_size must be at least 1")
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dimension or 0), dtype=np.float32)
        if n <= batch_size:
            return step(texts)
        # Sort by length so each run pads to a similar length, then restore the caller's order.
        order = sorted(range(n), key=lambda i: len(texts[i]) if isinstance(texts[i], str) else 0)
        parts = [step([texts[i] for i in order[s : s + batch_size]]) for s in range(0, n, batch_size)]
        out = np.empty((n, parts[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(parts)
        return out

    def embed(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Return sentence embeddings, float32 [n, dim], pooled as sentence-transformers does."""
        if self._pooling is None:
            raise RequestError(f"{self.manifest.ref} is a {self.manifest.task.value} model; use classify()")
        spec = self._pooling

        def step(chunk: list[str]) -> np.ndarray:
            hidden, mask = self._run(chunk)
            return pool(hidden, mask, spec)

        return self._batched(texts, batch_size, step)

    def classify(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Return classifier logits, float32 [n, labels]."""
        if self._pooling is not None:
            raise RequestError(f"{self.manifest.ref} is a {self.manifest.task.value} model; use embed()")

        def step(chunk: list[str]) -> np.ndarray:
            return self._run(chunk)[0].astype(np.float32, copy=False)

        return self._batched(texts, batch_size, step)
