"""The on-device generator: chat rendering, streaming, stops, sampling, context limits, scoring."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import RequestError
from edge.protocol.bundle import BundleReader
from edge.protocol.catalog import load_catalog
from edge.protocol.profile import parse_profile
from edge.runtime.chat import ChatTemplate
from edge.runtime.generator import GenerationEvent, GenerationParams, LLMModel
from edge.runtime.model import load_model
from edge.runtime.textstream import IncrementalDetokenizer, StopMatcher
from tests.fixtures.tiny_llms import TinyLLMs, tiny_llms, torch_greedy
from tests.fixtures.offline import _offline, _one_torch_thread  # noqa: F401  (autouse fixtures)

LEARNED = "What is the capital of France?"
EMOJI = "Write a short greeting with an emoji."


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyLLMs:
    return tiny_llms(tmp_path_factory.getbasetemp() / "tiny-llms")


def _fp32_profile():
    data = load_catalog().get("x86-avx2").to_dict()
    data["name"] = "test-fp32"
    data["models"]["llm"] = {"precision": "fp32"}
    return parse_profile(data)


@pytest.fixture(scope="session")
def llama_fp32(tiny: TinyLLMs, tmp_path_factory: pytest.TempPathFactory, signing_key, trust) -> LLMModel:
    """The tiny Llama exported in fp32 (so greedy tokens must equal torch's), loaded from its bundle."""
    from exporters.pipeline import ExportRequest, run_export

    base = tmp_path_factory.mktemp("llama-fp32")
    result = run_export(ExportRequest(source=str(tiny.llama), profile=_fp32_profile(), signing_key=signing_key,
                                      out_dir=base / "out"))
    with BundleReader(result.bundle) as reader:
        verified = reader.extract(base / "payload", trust)
    model = load_model(base / "payload", verified.manifest, threads=1)
    assert isinstance(model, LLMModel)
    return model


def chat_ids(model: LLMModel, prompt: str) -> list[int]:
    return model.encode(model.render_chat([{"role": "user", "content": prompt}]))


def run(model: LLMModel, ids: list[int], **params) -> list[GenerationEvent]:
    return list(model.generate(ids, GenerationParams(**params)))


@pytest.mark.parametrize("prompt", [LEARNED, EMOJI, "Tell me about dogs.", "Count to ten please"])
def test_greedy_tokens_equal_the_torch_model(llama_fp32, tiny, prompt) -> None:
    events = run(llama_fp32, chat_ids(llama_fp32, prompt), max_tokens=20)
    assert [e.token_id for e in events] == torch_greedy(tiny.llama, prompt, 20)


def test_render_chat_matches_transformers(llama_fp32, tiny) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.llama)
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ça va? 東京"},
         {"role": "assistant", "content": "Oui."}, {"role": "user", "content": "Et toi?"}],
    ]
    for chat in chats:
        for gen in (True, False):
            ours = llama_fp32.render_chat(chat, add_generation_prompt=gen)
            assert ours == tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert llama_fp32.encode(ours) == tok.apply_chat_template(chat, add_generation_prompt=gen)


def test_chat_template_helpers_and_errors() -> None:
    strict = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% generation %}!{% endgeneration %}{% endfor %}",
        {"bos_token": "<s>"})
    assert strict.render([{"role": "user", "content": "é"}]) == '<s>"é"!'
    with pytest.raises(RequestError, match="first message must be from the user"):
        strict.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(RequestError):
        strict.render([])
    with pytest.raises(RequestError, match="no role"):
        strict.render([{"content": "x"}])
    # the sandbox refuses attribute access to Python internals
    evil = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(RequestError):
        evil.render([{"role": "user", "content": "x"}])


def test_streaming_deltas_add_up_and_end_with_a_reason(llama_fp32) -> None:
    events = run(llama_fp32, chat_ids(llama_fp32, LEARNED), max_tokens=30)
    assert all(e.finish_reason is None for e in events[:-1])
    last = events[-1]
    assert last.finish_reason == "stop" and last.token_id in llama_fp32.manifest.llm.eos_token_ids
    text = "".join(e.text for e in events)
    assert text == "The capital of France is Paris."
    assert text == llama_fp32.decode([e.token_id for e in events])


def test_multibyte_characters_are_never_split(llama_fp32) -> None:
    events = run(llama_fp32, chat_ids(llama_fp32, EMOJI), max_tokens=20)
    assert "👋" in "".join(e.text for e in events)
    assert all("\ufffd" not in e.text for e in events)
    # the emoji takes several byte-level tokens: some events carry no text at all
    assert any(e.text == "" for e in events[:-1])

    detok = IncrementalDetokenizer(llama_fp32.tokenizer)
    text = "Hello 👋 東京, ça va? 🇫🇷"
    deltas = [detok.add(i) for i in llama_fp32.encode(text)] + [detok.flush()]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


def test_max_tokens_ends_with_length(llama_fp32) -> None:
    events = run(llama_fp32, chat_ids(llama_fp32, LEARNED), max_tokens=3)
    assert len(events) == 3 and events[-1].finish_reason == "length"
    assert "".join(e.text for e in events) == llama_fp32.decode([e.token_id for e in events])
    ignored = run(llama_fp32, chat_ids(llama_fp32, LEARNED), max_tokens=12, ignore_eos=True)
    assert len(ignored) == 12 and ignored[-1].finish_reason == "length"


def test_stop_strings_cut_the_text_and_are_never_streamed(llama_fp32) -> None:
    ids = chat_ids(llama_fp32, LEARNED)
    events = run(llama_fp32, ids, max_tokens=30, stop=["Paris"])
    assert "".join(e.text for e in events) == "The capital of France is "
    assert events[-1].finish_reason == "stop"
    # a stop string spanning token boundaries is held back until it is decided
    events = run(llama_fp32, ids, max_tokens=30, stop=["of Fr", "zzz"])
    assert "".join(e.text for e in events) == "The capital "
    assert events[-1].finish_reason == "stop"
    # a held-back prefix that never completes is released at the end
    events = run(llama_fp32, ids, max_tokens=30, stop=["Paris!"])
    assert "".join(e.text for e in events) == "The capital of France is Paris."


def test_stop_matcher_units() -> None:
    m = StopMatcher(["END", "stop here"])
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("X") == ("ENX", False)
    assert m.feed("stop h") == ("", False)
    assert m.feed("ere and more") == ("", True)
    m = StopMatcher([])
    assert m.feed("anything") == ("anything", False)


def test_sampling_is_reproducible_with_a_seed(llama_fp32) -> None:
    ids = chat_ids(llama_fp32, "Tell me about dogs.")

    def tokens(seed, **kw):
        return [e.token_id for e in run(llama_fp32, ids, max_tokens=16, temperature=1.5, seed=seed, ignore_eos=True, **kw)]

    assert tokens(7) == tokens(7)
    assert len({tuple(tokens(s)) for s in range(5)}) > 1
    # a nucleus that holds only the most likely token is greedy decoding
    greedy = [e.token_id for e in run(llama_fp32, ids, max_tokens=16, ignore_eos=True)]
    assert tokens(3, top_p=1e-9) == greedy


def test_cancellation_stops_between_tokens(llama_fp32) -> None:
    seen = []
    events = []
    for e in llama_fp32.generate(chat_ids(llama_fp32, "Tell me about dogs."),
                                 GenerationParams(max_tokens=50, ignore_eos=True), should_stop=lambda: len(seen) >= 3):
        events.append(e)
        seen.append(e)
    assert events[-1].finish_reason == "cancelled" and events[-1].token_id is None
    assert len(events) == 4
    first = list(llama_fp32.generate(chat_ids(llama_fp32, LEARNED), GenerationParams(), should_stop=lambda: True))
    assert [(e.token_id, e.finish_reason) for e in first] == [(None, "cancelled")]


def test_context_limit(llama_fp32) -> None:
    limit = llama_fp32.max_context
    assert limit == 256
    with pytest.raises(RequestError, match="context"):
        llama_fp32.generate([5] * limit, GenerationParams(max_tokens=1))
    events = run(llama_fp32, [5] * (limit - 3), max_tokens=10, ignore_eos=True)
    assert len(events) == 3 and events[-1].finish_reason == "length"
    with pytest.raises(RequestError, match="empty"):
        llama_fp32.generate([], GenerationParams())
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llama_fp32.generate([10**6], GenerationParams())
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(stop=[1])):
        with pytest.raises(RequestError):
            GenerationParams(**bad)


def test_chunked_prefill_and_buffer_reuse_give_the_same_tokens(llama_fp32) -> None:
    ids = chat_ids(llama_fp32, "Tell me about dogs and cats and the capital of France.")
    whole = [e.token_id for e in run(llama_fp32, ids, max_tokens=12, ignore_eos=True)]
    assert [e.token_id for e in run(llama_fp32, ids, max_tokens=12, ignore_eos=True)] == whole
    decoder = llama_fp32.decoder
    saved = decoder.prefill_chunk
    decoder.prefill_chunk = 5  # several prompt chunks, each attending to the cache of the previous ones
    try:
        assert [e.token_id for e in run(llama_fp32, ids, max_tokens=12, ignore_eos=True)] == whole
    finally:
        decoder.prefill_chunk = saved


def test_score_matches_torch_log_probs(llama_fp32, tiny) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ids = chat_ids(llama_fp32, LEARNED) + [5, 9, 17]
    lp = llama_fp32.score(ids)
    assert lp.shape == (len(ids), llama_fp32.manifest.llm.vocab_size)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-4)
    model = AutoModelForCausalLM.from_pretrained(tiny.llama, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
    np.testing.assert_allclose(lp, ref, atol=2e-4)
    with pytest.raises(RequestError):
        llama_fp32.score([0] * (llama_fp32.max_context + 1))
