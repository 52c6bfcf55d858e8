"""Tiny models for the server tests, built here (nothing downloaded).

* :func:`make_installed` writes the shared generic model (tests/fixtures/bundles.py) into a folder
  as the store would, for in-process registry tests with a :class:`ListSource`.
* :func:`make_encoder_bundle` writes a signed feature-extraction bundle: a word-level tokenizer
  and an ONNX graph whose token embeddings are a lookup table, so :func:`expected_embedding`
  computes in numpy what sentence-transformers' mean pooling and normalization give.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.protocol.bundle import describe_payload, write_bundle
from edge.protocol.manifest import Manifest, Pooling, TensorSpec
from edge.protocol.signing import SigningKey
from tests.fixtures.bundles import generic_model_bytes, make_manifest, version_seed

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "edge", "devices", "run", "models", "offline", "fast"]
DIM = 8
TABLE = np.random.default_rng(42).standard_normal((len(WORDS), DIM)).astype(np.float32)


@dataclass(frozen=True)
class Installed:
    """An installed model as the store reports it."""

    name: str
    version: str
    folder: Path
    manifest: Manifest
    key_id: str | None = None
    active: bool = True


def make_installed(root: Path, name: str = "tiny", version: str = "1.0.0") -> Installed:
    """Write the generic model into a folder as if the store had installed it."""
    folder = root / name / version
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(generic_model_bytes(version_seed(version)))
    return Installed(name, version, folder, make_manifest(folder, name=name, version=version))


class ListSource:
    """A model source holding a fixed list (what the store's active() would return)."""

    def __init__(self, installed: list[Installed]) -> None:
        self.installed = list(installed)
        self.unhealthy: list[tuple[str, str, str]] = []
        self.healthy: list[tuple[str, str]] = []

    def active(self) -> list[Installed]:
        """Return the active versions."""
        return [m for m in self.installed if m.active]

    def list(self) -> list[Installed]:
        """Return every version."""
        return list(self.installed)

    def mark_healthy(self, name: str, version: str) -> None:
        """Record a model that loaded."""
        self.healthy.append((name, version))

    def mark_unhealthy(self, name: str, version: str, reason: str) -> None:
        """Record a model that failed (no rollback target)."""
        self.unhealthy.append((name, version, reason))


def tokenize(text: str) -> list[int]:
    """Return the token ids the tiny tokenizer gives (with [CLS] and [SEP])."""
    ids = [WORDS.index(w) if w in WORDS else 1 for w in text.lower().split()]
    return [2, *ids, 3]


def expected_embedding(text: str) -> np.ndarray:
    """Return the mean-pooled, L2-normalized embedding of ``text``."""
    v = TABLE[tokenize(text)].mean(axis=0)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str()


def _encoder_onnx() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
            helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]),
            helper.make_node("Mul", ["emb", "mask3"], ["last_hidden_state"]),
        ],
        "tiny-encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["n", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["n", "seq", DIM])],
        [numpy_helper.from_array(TABLE, "table"), numpy_helper.from_array(np.array([2], np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def make_encoder_bundle(out_dir: Path, key: SigningKey, name: str = "embedder", version: str = "1.0.0") -> Path:
    """Write a signed feature-extraction bundle of the tiny encoder."""
    payload = out_dir / f".payload-{name}-{version}"
    payload.mkdir(parents=True)
    (payload / "model.onnx").write_bytes(_encoder_onnx())
    (payload / "tokenizer.json").write_text(_tokenizer_json())
    (payload / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16, "pad_token": "[PAD]"}))
    roles = {"model.onnx": "model", "tokenizer.json": "tokenizer", "tokenizer_config.json": "tokenizer_config"}
    manifest = make_manifest(
        payload, name=name, version=version, task="feature-extraction",
        inputs=(TensorSpec(name="input_ids", dtype="int64", shape=("n", "seq")),
                TensorSpec(name="attention_mask", dtype="int64", shape=("n", "seq"))),
        outputs=(TensorSpec(name="last_hidden_state", dtype="float32", shape=("n", "seq", DIM)),),
        pooling=Pooling(mode="mean", normalize=True), files=tuple(describe_payload(payload, roles)),
    )
    return write_bundle(out_dir / f"{name}-{version}.edgebundle", manifest, payload, key)


# ---------------------------------------------------------------------------- tiny "LLM"
# A bigram decoder: the next token depends on the current one only (a lookup table of logits),
# with a real KV cache (each step appends to present.0.key/value) in optimum's "concat" layout.
# Its chat template writes the messages' words, so the last word of the prompt picks the answer:
# "... question" -> "the capital of france is paris" then end-of-turn; "... forever" -> "la la la ..."
# until max_tokens or the context ends.
LLM_WORDS = ["<|endoftext|>", "<|im_end|>", "[UNK]", "question", "the", "capital", "of", "france", "is",
             "paris", "forever", "la", "hello"]
ANSWER = "the capital of france is paris"
CONTEXT = 2048
LLM_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
_NEXT = {"question": "the", "the": "capital", "capital": "of", "of": "france", "france": "is", "is": "paris",
         "paris": "<|im_end|>", "forever": "la", "la": "la", "hello": "hello", "[UNK]": "<|im_end|>",
         "<|im_end|>": "<|im_end|>", "<|endoftext|>": "<|im_end|>"}


def _llm_onnx() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    v = len(LLM_WORDS)
    table = np.zeros((v, v), np.float32)
    for a, b in _NEXT.items():
        table[LLM_WORDS.index(a), LLM_WORDS.index(b)] = 10.0
    kv = np.arange(2 * v, dtype=np.float32).reshape(v, 2)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["logits"]),
             helper.make_node("Gather", ["kv", "input_ids"], ["new3"]),
             helper.make_node("Unsqueeze", ["new3", "axis1"], ["new"])]
    for part in ("key", "value"):
        nodes.append(helper.make_node("Concat", [f"past_key_values.0.{part}", "new"], [f"present.0.{part}"], axis=2))
    past = [helper.make_tensor_value_info(f"past_key_values.0.{p}", TensorProto.FLOAT, [1, 1, "past", 2])
            for p in ("key", "value")]
    present = [helper.make_tensor_value_info(f"present.0.{p}", TensorProto.FLOAT, [1, 1, "total", 2])
               for p in ("key", "value")]
    graph = helper.make_graph(
        nodes, "bigram",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]), *past],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", v]), *present],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(kv, "kv"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _llm_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LLM_WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_end|>")])
    return tok.to_str()


def make_llm_bundle(out_dir: Path, key: SigningKey, name: str = "chat", version: str = "1.0.0") -> Path:
    """Write a signed text-generation bundle of the bigram decoder."""
    from edge.protocol.manifest import LLMSpec

    payload = out_dir / f".payload-{name}-{version}"
    payload.mkdir(parents=True)
    (payload / "model.onnx").write_bytes(_llm_onnx())
    (payload / "tokenizer.json").write_text(_llm_tokenizer_json())
    (payload / "chat_template.jinja").write_text(LLM_TEMPLATE)
    (payload / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    roles = {"model.onnx": "model", "tokenizer.json": "tokenizer", "chat_template.jinja": "chat_template",
             "tokenizer_config.json": "tokenizer_config"}
    v = len(LLM_WORDS)
    kv_in = [TensorSpec(name=f"past_key_values.0.{p}", dtype="float32", shape=(1, 1, "past", 2)) for p in ("key", "value")]
    kv_out = [TensorSpec(name=f"present.0.{p}", dtype="float32", shape=(1, 1, "total", 2)) for p in ("key", "value")]
    manifest = make_manifest(
        payload, name=name, version=version, task="text-generation",
        inputs=(TensorSpec(name="input_ids", dtype="int64", shape=(1, "seq")), *kv_in),
        outputs=(TensorSpec(name="logits", dtype="float32", shape=(1, "seq", v)), *kv_out),
        llm=LLMSpec(num_layers=1, num_kv_heads=1, head_dim=2, vocab_size=v, max_context=CONTEXT,
                    eos_token_ids=(LLM_WORDS.index("<|im_end|>"),), kv_layout="concat", uses_position_ids=False),
        files=tuple(describe_payload(payload, roles)),
    )
    return write_bundle(out_dir / f"{name}-{version}.edgebundle", manifest, payload, key)
