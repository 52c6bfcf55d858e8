"""LLM fidelity: greedy reference sequences from the source model, teacher-forced metrics on ONNX.

The source model (torch) greedily continues every prompt; its log-probabilities at each generated
position are kept. A candidate is then fed the same sequences (teacher forcing, so one early
divergence does not poison the rest) and compared position by position:

* ``token_agreement``: share of positions where the candidate's argmax is the source's token;
* ``logprob_drift``: mean absolute difference of the log-probability given to the source's token.

Agreement catches changed answers (Paris turning into Barcelona); drift catches a model that still
picks the same tokens but has grown unsure of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

# Tokens generated per prompt: enough to cover a short answer and its end-of-turn token, few
# enough that the source model's generation stays a small part of the export time.
REFERENCE_NEW_TOKENS = 24


@dataclass
class LLMReference:
    """The source model's greedy continuations and its log-probs along them."""

    messages: list[list[dict[str, str]]]  # the chat each prompt came from
    prompt_ids: list[list[int]]
    generated: list[list[int]]  # the source's greedy tokens after each prompt
    source_logprobs: list[np.ndarray] = field(default_factory=list)  # log p(token) per generated position

    @property
    def count(self) -> int:
        """Return the number of prompts."""
        return len(self.prompt_ids)

    @property
    def positions(self) -> int:
        """Return the number of compared positions."""
        return sum(len(g) for g in self.generated)


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Render one chat with the source tokenizer's template (plain text when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in messages) + "\n"


def compute_reference(model: Any, tokenizer: Any, prompts: Sequence[str], eos_token_ids: Sequence[int],
                      max_context: int, new_tokens: int = REFERENCE_NEW_TOKENS) -> LLMReference:
    """Greedily continue each prompt with the torch model and record its log-probs."""
    import torch

    ref = LLMReference(messages=[], prompt_ids=[], generated=[])
    eos = list(eos_token_ids) or None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
        ids = ids[-(max_context - new_tokens):]
        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad, num_beams=1, return_dict_in_generate=True,
                                 output_logits=True)
        gen = out.sequences[0, len(ids):].tolist()
        if eos:  # generate pads after an early end-of-sequence: keep up to and including it
            for i, t in enumerate(gen):
                if t in eos:
                    gen = gen[: i + 1]
                    break
        # the raw logits of each step (before any logits processor), one row per generated token
        logits = torch.cat([step[:1] for step in out.logits[: len(gen)]]).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs[torch.arange(len(gen)), torch.tensor(gen)].numpy()
        ref.messages.append(messages)
        ref.prompt_ids.append(list(ids))
        ref.generated.append(gen)
        ref.source_logprobs.append(picked.astype(np.float64))
    return ref


def llm_metrics(reference: LLMReference, score: Callable[[list[int]], np.ndarray]) -> dict[str, float]:
    """Compare a candidate's teacher-forced log-probs (``score(ids) -> [len, vocab]``) to the reference."""
    agree, drift, n = 0, 0.0, 0
    for prompt, gen, src_lp in zip(reference.prompt_ids, reference.generated, reference.source_logprobs):
        if not gen:
            continue
        lp = score(prompt + gen)[len(prompt) - 1: len(prompt) - 1 + len(gen)]
        tokens = np.asarray(gen)
        agree += int((lp.argmax(axis=-1) == tokens).sum())
        drift += float(np.abs(lp[np.arange(len(gen)), tokens].astype(np.float64) - src_lp).sum())
        n += len(gen)
    if n == 0:
        return {"token_agreement": 0.0, "logprob_drift": float("inf")}
    return {"token_agreement": agree / n, "logprob_drift": drift / n}
