"""Encoders on the device: sentence embeddings and text classification from a bundle.

Embeddings are pooled and normalized exactly as sentence-transformers does (``manifest.pooling``):
mean over the attention mask, the first (CLS) token, the max over real tokens, or the last real
token; then L2-normalized when the model ends with a Normalize module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

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
# What one more ORT run costs, in padded tokens: the split of a batch into runs weighs this
# against the padding a run saves. MiniLM int8, 2 threads, batches of 16 sentences of 6-40
# words: 16, 32 and 64 all ran ~1.6x the texts/s of one run padded to the longest.
RUN_COST_TOKENS = 32
# Texts tokenized together: one padded id matrix per group stays small (256 x 512 int64 = 1 MB).
GROUP_SIZE = 256
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


def plan_runs(lengths: Sequence[int], max_rows: int, run_cost: int = RUN_COST_TOKENS) -> list[tuple[int, int]]:
    """Split ascending token ``lengths`` into runs ``[start, end)`` of at most ``max_rows`` texts.

    Each run pads to its longest text; the split minimizes padded tokens plus ``run_cost`` per run.
    """
    n = len(lengths)
    best = [0] + [float("inf")] * n  # best[i]: cheapest cost of the first i texts
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = int(lengths[end - 1])
        for start in range(max(0, end - max_rows), end):
            cost = best[start] + (end - start) * longest + run_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs = []
    end = n
    while end > 0:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]


class EncoderModel(LoadedModel):
    """A feature-extraction or text-classification bundle: texts in, embeddings or logits out."""

    # Encoder runs are large and arrive in bursts from the batcher, beside the server's event loop
    # and the tokenizer: spinning pool threads took the cores from them. MiniLM int8, 2 threads,
    # batches of 16 sentences on a busy 2-core machine: 1.3-2.5x the texts/s with spinning off.
    SPINNING = False

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

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        try:
            return self.session.run(self._out_names, feed)[0]
        except Exception as exc:  # ORT's errors are untyped; translate once, here
            raise InferenceError(f"{self.manifest.ref}: inference failed: {exc}") from exc

    def _batched(self, texts: list[str], batch_size: int,
                 finish: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """Run ``texts`` in length-sorted runs; return the finished rows in order and the token counts.

        Each group of texts is tokenized once, sorted by token count and split by
        :func:`plan_runs`, so a run pads only to its own longest text.
        """
        if not isinstance(texts, (list, tuple)):
            raise RequestError("texts must be a list of strings")
        if batch_size < 1:
            raise RequestError("batch_size must be at least 1")
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dimension or 0), dtype=np.float32), []
        order = list(range(n))
        if n > GROUP_SIZE:  # groups of similar length: a group pads its id matrix to its longest text
            order.sort(key=lambda i: len(texts[i]) if isinstance(texts[i], str) else 0)
        out: np.ndarray | None = None
        counts = np.empty(n, dtype=np.int64)
        for g in range(0, n, GROUP_SIZE):
            idx = np.asarray(order[g:g + GROUP_SIZE])
            batch = self.tokenizer.encode([texts[i] for i in idx], token_types=self._token_types)
            lengths = batch.attention_mask.sum(axis=1)  # right-padded: real tokens come first
            # At least one column per run: an empty text (no special tokens) still gets a row.
            widths = np.minimum(np.maximum(lengths, 1), batch.input_ids.shape[1])
            by_length = np.argsort(widths, kind="stable")
            for start, end in plan_runs(widths[by_length], batch_size):
                rows = by_length[start:end]
                width = int(widths[rows[-1]])
                mask = batch.attention_mask[rows, :width]
                feed = {"input_ids": batch.input_ids[rows, :width], "attention_mask": mask}
                if batch.token_type_ids is not None:
                    feed["token_type_ids"] = batch.token_type_ids[rows, :width]
                result = finish(self._run(feed), mask)
                if out is None:
                    out = np.empty((n, result.shape[1]), dtype=np.float32)
                out[idx[rows]] = result
            counts[idx] = lengths
        # A text at the limit may have been truncated: count those again, untruncated.
        cut = np.flatnonzero(counts >= self.max_length)
        if cut.size:
            counts[cut] = self.tokenizer.count([texts[i] for i in cut])
        return out, counts.tolist()  # type: ignore[return-value]  # n > 0: every row was written

    def embed(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Return sentence embeddings, float32 [n, dim], pooled as sentence-transformers does."""
        return self.embed_counted(texts, batch_size)[0]

    def embed_counted(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, list[int]]:
        """Return sentence embeddings and each text's token count (as :meth:`count_tokens` counts)."""
        if self._pooling is None:
            raise RequestError(f"{self.manifest.ref} is a {self.manifest.task.value} model; use classify()")
        spec = self._pooling
        return self._batched(texts, batch_size, lambda hidden, mask: pool(hidden, mask, spec))

    def classify(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Return classifier logits, float32 [n, labels]."""
        if self._pooling is not None:
            raise RequestError(f"{self.manifest.ref} is a {self.manifest.task.value} model; use embed()")
        return self._batched(texts, batch_size, lambda logits, mask: logits.astype(np.float32, copy=False))[0]
