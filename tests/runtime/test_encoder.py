"""The device-side encoder runtime: tokenizer limits, pooling, batching and errors."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edge.errors import BundleError, RequestError
from edge.protocol.bundle import BundleReader
from edge.protocol.catalog import load_catalog
from edge.protocol.manifest import Pooling
from edge.runtime.encoder import GROUP_SIZE, EncoderModel, plan_runs, pool
from edge.runtime.model import load_model
from edge.runtime.tokenizer import TextTokenizer, resolve_max_length
from tests.fixtures.tiny_encoders import ST_MAX_SEQ_LENGTH, build_tokenizer, shared_bundle, shared_tiny_encoders


def _padded_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((4, 7, 5)).astype(np.float32)
    lengths = [7, 3, 1, 5]
    mask = np.array([[1] * n + [0] * (7 - n) for n in lengths], dtype=np.int64)
    hidden[mask == 0] = 50.0  # padding positions hold garbage that must not leak into the result
    return hidden, mask


def _expected(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    rows = []
    for h, m in zip(hidden, mask):
        real = h[: int(m.sum())]
        rows.append({"mean": real.mean(0), "cls": real[0], "max": real.max(0), "lasttoken": real[-1]}[mode])
    return np.stack(rows)


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "lasttoken"])
@pytest.mark.parametrize("normalize", [True, False])
def test_pool_matches_the_definition(mode: str, normalize: bool) -> None:
    hidden, mask = _padded_batch()
    got = pool(hidden, mask, Pooling(mode=mode, normalize=normalize))
    want = _expected(hidden, mask, mode)
    if normalize:
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "lasttoken"])
def test_pool_matches_sentence_transformers(mode: str) -> None:
    torch = pytest.importorskip("torch")
    st_pooling = pytest.importorskip("sentence_transformers.sentence_transformer.modules.pooling")
    hidden, mask = _padded_batch(1)
    module = st_pooling.Pooling(5, pooling_mode=mode)
    out = module({"token_embeddings": torch.from_numpy(hidden), "attention_mask": torch.from_numpy(mask)})
    want = out["sentence_embedding"].numpy()
    np.testing.assert_allclose(pool(hidden, mask, Pooling(mode=mode, normalize=False)), want, rtol=1e-5, atol=1e-6)


def test_pool_of_zero_vector_stays_finite() -> None:
    got = pool(np.zeros((1, 2, 3), np.float32), np.array([[1, 1]]), Pooling())
    assert np.isfinite(got).all() and not got.any()


@pytest.fixture()
def tok_folder(tmp_path: Path) -> Path:
    build_tokenizer(tmp_path, model_max_length=512)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 16}))
    return tmp_path


def test_max_length_sentence_transformers_config_wins(tok_folder: Path) -> None:
    assert resolve_max_length(tok_folder) == 16  # tokenizer 512, capped by 16 positions
    (tok_folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    assert resolve_max_length(tok_folder) == 8
    (tok_folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    assert resolve_max_length(tok_folder) == 16  # never past the positions the model has


def test_max_length_roberta_offset_and_no_limit_sentinel(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "max_position_embeddings": 514,
                                                      "pad_token_id": 1}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))
    assert resolve_max_length(tmp_path) == 512


def test_tokenizer_truncates_pads_and_counts(tok_folder: Path) -> None:
    tok = TextTokenizer.from_folder(tok_folder)
    assert tok.max_length == 16
    long = "a " * 40
    batch = tok.encode(["hi", long, "the dog"], token_types=False)
    assert batch.token_type_ids is None
    assert batch.input_ids.shape == (3, 16) and batch.input_ids.dtype == np.int64
    assert batch.attention_mask.tolist()[0] == [1, 1, 1, 1] + [0] * 12  # [CLS] h ##i [SEP]
    assert batch.input_ids[0, 4:].tolist() == [tok.pad_id] * 12
    assert tok.count(["hi", long]) == [4, 42]  # before truncation, special tokens included
    short = tok.encode(["hi", "the"])
    assert short.input_ids.shape == (2, 4) and short.token_type_ids.shape == (2, 4)  # padded to the longest


def test_tokenizer_refuses_non_strings_and_bad_files(tok_folder: Path, tmp_path: Path) -> None:
    tok = TextTokenizer.from_folder(tok_folder)
    with pytest.raises(RequestError):
        tok.encode(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(RequestError):
        tok.encode("not a list")  # type: ignore[arg-type]
    (tok_folder / "tokenizer.json").write_text("{broken")
    with pytest.raises(BundleError):
        TextTokenizer.from_folder(tok_folder)
    with pytest.raises(BundleError, match="no tokenizer.json"):
        TextTokenizer.from_folder(tmp_path / "nothing-here")


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory, signing_key) -> EncoderModel:
    pytest.importorskip("optimum")
    base = tmp_path_factory.getbasetemp()
    tiny = shared_tiny_encoders(base)
    bundle = shared_bundle(base, tiny.embedder, "x86-avx2", signing_key)
    dest = tmp_path_factory.mktemp("payload")
    with BundleReader(bundle) as reader:
        reader.extract(dest, None)
        manifest = reader.manifest
    model = load_model(dest, manifest, load_catalog().get(manifest.profile), threads=1)
    assert isinstance(model, EncoderModel)
    return model


TEXTS = ["the quick brown fox", "a", "error: access denied!", "the " * 200, "paris is sunny", "你好", "dog and cat"]


def test_batching_keeps_order_and_barely_changes_embeddings(embedder: EncoderModel) -> None:
    one_by_one = np.concatenate([embedder.embed([t]) for t in TEXTS])
    chunked = embedder.embed(TEXTS, batch_size=3)  # sorted by length, chunked, order restored
    together = embedder.embed(TEXTS)
    assert chunked.shape == (len(TEXTS), 32)
    # int8 activations are quantized per run, so batch-mates shift results slightly, never rows.
    for got in (chunked, together):
        sims = got @ one_by_one.T
        assert (sims.argmax(axis=1) == np.arange(len(TEXTS))).all()
        assert np.diag(sims).min() > 0.999


def test_embedder_properties_and_limits(embedder: EncoderModel) -> None:
    assert embedder.max_length == ST_MAX_SEQ_LENGTH and embedder.labels == () and embedder.dimension == 32
    counts = embedder.count_tokens(["the dog", "the " * 200])
    assert counts == [4, 202]
    assert embedder.embed([]).shape == (0, 32)
    with pytest.raises(RequestError, match="use embed"):
        embedder.classify(["x"])
    with pytest.raises(RequestError):
        embedder.embed([1, 2])  # type: ignore[list-item]
    with pytest.raises(RequestError):
        embedder.embed(["x"], batch_size=0)


def test_embed_is_thread_safe(embedder: EncoderModel) -> None:
    want = embedder.embed(TEXTS)
    with ThreadPoolExecutor(4) as pool_:
        results = list(pool_.map(lambda _: embedder.embed(TEXTS), range(8)))
    for got in results:
        np.testing.assert_allclose(got, want, atol=1e-5)


def _brute_force_cost(lengths: list[int], max_rows: int, run_cost: int) -> int:
    """Cheapest split of ascending lengths into contiguous runs, by trying every split."""
    n = len(lengths)
    best = None
    for mask in range(1 << max(n - 1, 0)):  # bit i set: a run ends after text i
        cost, start = 0, 0
        for i in range(n):
            if i == n - 1 or mask >> i & 1:
                if i + 1 - start > max_rows:
                    break
                cost += (i + 1 - start) * lengths[i] + run_cost
                start = i + 1
        else:
            best = cost if best is None else min(best, cost)
    assert best is not None
    return best


def test_plan_runs_pads_little_and_respects_the_run_size() -> None:
    equal = plan_runs([10] * 70, 32)  # any three runs of at most 32 cost the same
    assert len(equal) == 3 and all(end - start <= 32 for start, end in equal)
    # Ten short texts do not pad to two long ones: splitting saves far more than one run costs.
    assert plan_runs([5] * 10 + [100] * 2, 32, run_cost=64) == [(0, 10), (10, 12)]
    assert plan_runs([7], 1) == [(0, 1)]
    rng = np.random.default_rng(0)
    for _ in range(60):
        n, max_rows, run_cost = int(rng.integers(1, 9)), int(rng.integers(1, 5)), int(rng.integers(0, 80))
        lengths = sorted(int(v) for v in rng.integers(1, 60, size=n))
        runs = plan_runs(lengths, max_rows, run_cost)
        assert [r[0] for r in runs] == [0] + [r[1] for r in runs[:-1]] and runs[-1][1] == n
        assert all(0 < end - start <= max_rows for start, end in runs)
        cost = sum((end - start) * lengths[end - 1] + run_cost for start, end in runs)
        assert cost == _brute_force_cost(lengths, max_rows, run_cost)


def test_embed_counted_counts_as_count_tokens_does(embedder: EncoderModel) -> None:
    texts = [*TEXTS, "", "the " * 300]  # two texts past the limit are counted untruncated
    vectors, counts = embedder.embed_counted(texts)
    assert counts == embedder.count_tokens(texts)
    assert max(counts) > embedder.max_length
    np.testing.assert_allclose(vectors, embedder.embed(texts), atol=1e-6)


def test_more_texts_than_a_group_keep_their_order(embedder: EncoderModel) -> None:
    texts = [f"{'word ' * (i % 13)}item {i}" for i in range(GROUP_SIZE + 40)]
    vectors, counts = embedder.embed_counted(texts, batch_size=16)
    assert counts == embedder.count_tokens(texts)
    picks = [0, 7, GROUP_SIZE - 1, GROUP_SIZE, len(texts) - 1]
    single = np.concatenate([embedder.embed([texts[i]]) for i in picks])
    assert np.diag(vectors[picks] @ single.T).min() > 0.999


def test_encoder_sessions_do_not_spin(embedder: EncoderModel) -> None:
    # Pool threads that busy-wait take the cores from the server's event loop and tokenizer.
    options = embedder.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
