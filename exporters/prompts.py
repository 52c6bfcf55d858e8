"""Built-in chat prompts for the LLM fidelity gate (used when `edge export` gets no --samples).

Short, everyday requests of the kind an edge assistant answers: facts, arithmetic, a little code,
a translation, non-ASCII text. Each is one user turn rendered with the model's chat template.
"""

from __future__ import annotations

from pathlib import Path

from edge.errors import ConfigError

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Give me three tips for staying focused while working from home.",
    "What is 17 multiplied by 3?",
    "Write a Python function that returns the square of a number.",
    "Translate 'good morning, how are you?' into Spanish.",
    "Explain in one sentence what a thermostat does.",
    "Name the planets of the solar system in order from the Sun.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What should I check if my bicycle tyre keeps going flat?",
    "Écris une phrase courte sur la météo d'aujourd'hui.",
    "Why is the sky blue?",
    "List three healthy breakfast ideas.",
)
# Lines read from a --samples file at most: the gate runs the source model on every one.
MAX_SAMPLE_PROMPTS = 256


def load_prompts(samples: Path | None) -> list[str]:
    """Return the prompts to measure: one per non-empty line of ``samples``, else the built-in set."""
    if samples is None:
        return list(PROMPTS)
    try:
        lines = samples.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read samples file {samples}: {exc}") from exc
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"samples file {samples} has no prompts", hint="write one prompt per line")
    if len(prompts) > MAX_SAMPLE_PROMPTS:
        raise ConfigError(f"samples file {samples} has {len(prompts)} prompts, over {MAX_SAMPLE_PROMPTS}",
                          hint="the gate runs the source model on each; keep a representative few")
    return prompts
