"""Numbers about a set of pairs that say what the losses can learn from them.

    from fire_mpo_core.judge.stats import pair_statistics
    pair_statistics(pairs)   # {"span_word_share": 0.31, "visual_reversible": 212, ...}

* ``span_word_share``: share of the response words (chosen and rejected, whitespace-split) that
  overlap a marked span. Where it is 1, span-level ranking and the span KL are sequence-level
  DPO and RRPO; the lower it is, the more token-level precision matters.
* ``pairs_all_span``: pairs whose every word lies in a span (the two losses coincide there).
* ``visual_reversible``: pairs for which removing the lesion makes y- right
  (``PreferencePair.reverses_on_removal``): where the reverse visual term is semantically right.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fire_mpo_core.data.records import PreferencePair

_WORD = re.compile(r"\S+")


def _words_in_spans(text: str, spans) -> tuple[int, int]:
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    inside = sum(1 for a, b in words if any(a < e and s < b for s, e in spans))
    return inside, len(words)


def pair_statistics(pairs: Sequence[PreferencePair]) -> dict[str, float | int | None]:
    """Span coverage and visual-term eligibility of ``pairs`` (module docstring)."""
    inside = total = all_span = 0
    for p in pairs:
        a, n = _words_in_spans(p.chosen, p.chosen_spans)
        b, m = _words_in_spans(p.rejected, p.rejected_spans)
        inside, total = inside + a + b, total + n + m
        all_span += int(a == n and b == m)
    return {
        "span_word_share": round(inside / total, 4) if total else None,
        "pairs_all_span": all_span,
        "visual_reversible": sum(1 for p in pairs if p.reverses_on_removal),
    }
