"""Built-in sample sets for the fidelity gate, and readers for the user's own.

The built-in texts are deliberately varied, because quantization error concentrates in the
unusual inputs: very short and very long sentences (past 128 tokens, so truncation and long
attention spans are exercised), non-English scripts, emoji, source code, numbers, URLs and
markup. A gate that only sees tidy English sentences misses the one input a quantized encoder
gets badly wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import ConfigError

# More than this many user samples only slows the gate down without changing its verdict much.
MAX_SAMPLES = 1024
# A single user sample longer than this (characters) is a formatting mistake, not a sentence.
MAX_SAMPLE_CHARS = 100_000

_LONG_1 = (
    "The committee reviewed the quarterly report in detail, noting that although revenue grew by "
    "roughly twelve percent compared with the same period last year, operating costs rose even "
    "faster because of higher energy prices, new hires in the support team, and a one-off "
    "payment to settle a long-running contract dispute; the chair asked the finance team to "
    "prepare a revised forecast before the next meeting, to model at least three scenarios for "
    "energy prices, and to explain which of the new support roles could be funded from savings "
    "elsewhere rather than from the reserve that the board had set aside for the planned "
    "expansion into two new regional markets in the spring."
)
_LONG_2 = (
    "Edge devices in the field are often installed in places where nobody can reach them easily: "
    "on top of wind turbines, inside cold-storage warehouses, at the back of shops behind a "
    "locked door, or on farms hours away from the nearest town. An update that bricks such a "
    "device costs a day of travel, so the software that manages them must write the new version "
    "beside the running one, switch over atomically, check that the new version is healthy, and "
    "roll back on its own when it is not, all without a person watching. " * 3
).strip()


def sample_texts() -> list[str]:
    """Return the built-in text samples (48 varied sentences) for encoder fidelity checks."""
    return [
        "A man is playing a guitar on the street.",
        "The quick brown fox jumps over the lazy dog.",
        "How do I reset my password if I no longer have access to my email?",
        "The weather in Paris is sunny with a light breeze this afternoon.",
        "Quantum computers use qubits, which can be in a superposition of states.",
        "She sold the house for $450,000 in March 2021, 15% above the asking price.",
        "Take 2 tablets every 6 hours, but do not exceed 8 tablets in 24 hours.",
        "Error 0x80070005: access is denied.",
        "Hi!",
        "ok",
        "Why?",
        "I absolutely loved this film, the acting was superb and the ending made me cry.",
        "Terrible service. The food was cold and the waiter was rude. Never again.",
        "The product is fine, I guess. Nothing special but it does the job.",
        "Le chat dort sur le canapé pendant que la pluie tombe dehors.",
        "Der Zug nach München fährt um 14:35 Uhr von Gleis 7 ab.",
        "El banco central subió los tipos de interés por tercera vez este año.",
        "今日はとても暑いので、冷たいお茶を飲みたいです。",
        "我们明天早上九点在会议室开会，请准时参加。",
        "Москва — столица России, крупнейший город страны.",
        "مرحبا بكم في مدينتنا الجميلة",
        "नमस्ते, आप कैसे हैं?",
        "Great job team 🎉🚀 see you all at the party 🍕!",
        "¿Dónde está la biblioteca? ¡Necesito estudiar!",
        "def add(a: int, b: int) -> int:\n    return a + b",
        "for (int i = 0; i < n; ++i) { sum += values[i] * weights[i]; }",
        "SELECT name, COUNT(*) FROM orders WHERE status = 'shipped' GROUP BY name;",
        '{"id": 42, "tags": ["alpha", "beta"], "active": true, "score": 3.14159}',
        "<div class=\"header\"><a href=\"/home\">Home</a></div>",
        "git commit -m 'Fix off-by-one error in the pagination logic'",
        "See https://example.com/docs/v2/install?lang=en#requirements for details.",
        "Contact support@example.org or call +1 (555) 010-9999 before 5 p.m. EST.",
        "3.14159 2.71828 1.41421 1.73205 0.57721 1.61803",
        "The invoice INV-2024-00917 totals €1,234.56 including 20% VAT.",
        "E = mc^2 and F = ma are two of the most famous equations in physics.",
        "THE MEETING HAS BEEN MOVED TO THURSDAY AT NOON!!!",
        "teh qiuck borwn fxo jmups oevr the lzay dgo",
        "Photosynthesis converts light energy into chemical energy stored in glucose.",
        "The mitochondria is the powerhouse of the cell.",
        "Can you recommend a good Italian restaurant near the train station?",
        "The patient presented with acute chest pain radiating to the left arm.",
        "Plaintiff alleges breach of contract and seeks damages of not less than $2 million.",
        "Neural networks are trained by minimizing a loss function with gradient descent.",
        "Put the blue box on top of the red one, then move both to the left shelf.",
        "Rain, rain, go away; come again another day.",
        "a b c d e f g h i j k l m n o p q r s t u v w x y z",
        _LONG_1,
        _LONG_2,
    ]


def read_text_samples(path: Path) -> list[str]:
    """Read a user's sample file: one text per line, blank lines skipped."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"sample file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read sample file {path}: {exc}", hint="use UTF-8 text, one sample per line") from exc
    texts = [line.strip() for line in raw.splitlines() if line.strip()]
    if not texts:
        raise ConfigError(f"sample file {path} holds no text", hint="write one sample per line")
    if len(texts) > MAX_SAMPLES:
        raise ConfigError(f"sample file {path} holds {len(texts)} samples, over the limit of {MAX_SAMPLES}",
                          hint="a few hundred varied samples are enough for the gate")
    too_long = [i + 1 for i, t in enumerate(texts) if len(t) > MAX_SAMPLE_CHARS]
    if too_long:
        raise ConfigError(f"sample file {path}: line {too_long[0]} is over {MAX_SAMPLE_CHARS} characters")
    return texts


def read_array_samples(path: Path) -> list[dict[str, np.ndarray]]:
    """Read a user's .npz of generic-model inputs: one array per input, first axis = samples."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise ConfigError(f"sample file {path} not found") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable .npz file: {exc}",
                          hint="save one array per model input with numpy.savez(path, name=array)") from exc
    if not arrays:
        raise ConfigError(f"sample file {path} holds no arrays")
    counts = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise ConfigError(f"sample file {path}: every array needs the same first (sample) axis, got {counts}")
    n = next(iter(counts.values()))
    if n > MAX_SAMPLES:
        raise ConfigError(f"sample file {path} holds {n} samples, over the limit of {MAX_SAMPLES}")
    return [{name: a[i : i + 1] for name, a in arrays.items()} for i in range(n)]
