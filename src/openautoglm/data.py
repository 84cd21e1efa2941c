"""Text that ships with Python, for calibration, evaluation and benchmark prompts (no dataset downloads).

``pydoc_data.topics`` holds the Python reference manual's topics: about 120k tokens of real English prose
and code. The topics are joined in sorted order; the first half is the calibration split, the second half the
evaluation split, so evaluation never sees calibration text.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_text() -> str:
    t = corpus()
    return t[: len(t) // 2]


def evaluation_text() -> str:
    t = corpus()
    return t[len(t) // 2 :]


def calibration_tokens(tokenizer, n: int) -> list[int]:
    """Up to ``n`` tokens from the start of the calibration split (what the int8 KV cache's key smoothing sees)."""
    return tokenizer.encode(calibration_text()[: 12 * n], add_special_tokens=False)[:n]


def prompt_tokens(tokenizer, n: int) -> list[int]:
    """Exactly ``n`` tokens of real prose/code from the evaluation split (for benchmarks)."""
    ids = tokenizer.encode(evaluation_text(), add_special_tokens=False)
    if len(ids) < n:
        raise ValueError(f"the text has only {len(ids)} tokens, {n} requested")
    return ids[:n]
