"""Fidelity metrics: how closely a compiled model's outputs match the source model's.

Each function takes paired outputs (reference first) and returns plain floats keyed by the
metric names the profiles' thresholds use, so the gate can compare them directly.
"""

from __future__ import annotations

import numpy as np

# The p5 statistic: the cosine that 95% of samples reach or beat.
P5 = 5.0
# Vectors shorter than this count as zero: two zero vectors match, a zero and a non-zero do not.
_ZERO = 1e-12


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Return the cosine similarity of each row pair, float64 [n]."""
    a = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    b = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if a.shape != b.shape:
        raise ValueError(f"reference shape {a.shape} and candidate shape {b.shape} differ")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    out = dot / np.maximum(na * nb, _ZERO)
    both_zero = (na < _ZERO) & (nb < _ZERO)
    out[both_zero] = 1.0
    # NaN or inf in the candidate is a total mismatch, not a silently skipped sample.
    out[~np.isfinite(out)] = -1.0
    return np.clip(out, -1.0, 1.0)


def cosine_stats(values: np.ndarray, prefix: str = "cosine") -> dict[str, float]:
    """Return mean, 5th percentile and minimum of per-sample cosines."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples to measure")
    return {
        f"{prefix}_mean": float(values.mean()),
        f"{prefix}_p5": float(np.percentile(values, P5)),
        f"{prefix}_min": float(values.min()),
    }


def top1_agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    """Return the share of samples whose arg-max class is the same in both."""
    ref = np.asarray(reference_logits).argmax(axis=-1)
    cand = np.asarray(candidate_logits).argmax(axis=-1)
    if ref.shape != cand.shape:
        raise ValueError(f"reference shape {ref.shape} and candidate shape {cand.shape} differ")
    return float((ref == cand).mean()) if ref.size else 1.0


def flatten_outputs(outputs: list[np.ndarray]) -> np.ndarray:
    """Concatenate every output of one sample into one float64 vector (for generic models)."""
    parts = [np.asarray(o).astype(np.float64, copy=False).ravel() for o in outputs]
    return np.concatenate(parts) if parts else np.zeros(0)
