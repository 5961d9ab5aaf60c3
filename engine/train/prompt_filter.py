"""Which generated user turns to keep (``magpie.py``): whole, plain requests in the user's voice,
not repetitive, and not a near copy of one kept before (word 3-gram Jaccard similarity).

Every decision is counted by reason in ``stats``, so a run can report what was dropped and why.
"""

from __future__ import annotations

import re
from collections import Counter

ASSISTANT_STARTS = (
    "sure", "certainly", "of course", "absolutely", "as an ai", "i'm sorry", "i am sorry",
    "i'd be happy", "i would be happy", "here is", "here's", "great question", "hello! how can i",
    "hi! how can i", "hello, how can i", "how can i assist", "how can i help you",
)
ROLE_LABEL = re.compile(r"^\s*(user|assistant|system|human|ai)\s*[:\n]", re.IGNORECASE)
TEMPLATE_MARKS = ("<|", "|>", "<s>", "</s>", "[INST]", "\nassistant\n")
WORD = re.compile(r"[a-z0-9]+")
SHINGLE = 3
COMMON_SHINGLE = 400  # a shingle in more kept prompts than this is not used to find candidates


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _shingles(words: list[str]) -> frozenset:
    if len(words) < SHINGLE:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1))


def _is_repetitive(text: str, words: list[str]) -> bool:
    if re.search(r"(.)\1{19,}", text):
        return True
    if len(words) >= 8 and len(set(words)) / len(words) < 0.5:
        return True
    grams = Counter(" ".join(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1))
    return any(n >= 3 for n in grams.values())


def _letter_share(text: str) -> float:
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return 0.0
    return sum(c.isalpha() for c in visible) / len(visible)


class PromptFilter:
    def __init__(self, min_words: int = 3, max_chars: int = 1500, max_similarity: float = 0.6):
        self.min_words = min_words
        self.max_chars = max_chars
        self.max_similarity = max_similarity
        self.stats: Counter = Counter()
        self.exact: set[str] = set()
        self.kept: list[frozenset] = []  # shingles of every kept prompt
        self.index: dict[str, list[int]] = {}  # shingle -> kept prompts holding it

    def reason(self, text: str, finished: bool = True, opener: str = "") -> str | None:
        """Why ``text`` is dropped, or None to keep it. ``finished``: the turn ended by itself
        (not cut at the token limit); ``opener``: the words it was made to start with."""
        if not finished:
            return "unfinished"
        stripped = text.strip()
        words = _words(stripped)
        added = _words(stripped[len(opener):]) if stripped.startswith(opener) else words
        if len(words) < self.min_words or len(added) < 2 or len(stripped) < 10:
            return "too_short"
        if len(stripped) > self.max_chars:
            return "too_long"
        if ROLE_LABEL.match(stripped) or any(m in stripped for m in TEMPLATE_MARKS):
            return "template"
        if stripped.lower().startswith(ASSISTANT_STARTS):
            return "assistant_voice"
        if _letter_share(stripped) < 0.45:
            return "not_text"
        if _is_repetitive(stripped, words):
            return "repetitive"
        if " ".join(words) in self.exact:
            return "duplicate"
        if self.similarity(_shingles(words)) >= self.max_similarity:
            return "near_duplicate"
        return None

    def similarity(self, shingles: frozenset) -> float:
        """The highest Jaccard similarity of ``shingles`` to a kept prompt's."""
        shared: Counter = Counter()
        for s in shingles:
            holders = self.index.get(s, ())
            if len(holders) <= COMMON_SHINGLE:
                shared.update(holders)
        best = 0.0
        for other, inter in shared.items():
            union = len(shingles) + len(self.kept[other]) - inter
            best = max(best, inter / union)
        return best

    def add(self, text: str) -> None:
        """Remember ``text`` as kept (for the duplicate checks)."""
        words = _words(text.strip())
        self.exact.add(" ".join(words))
        shingles = _shingles(words)
        number = len(self.kept)
        self.kept.append(shingles)
        for s in shingles:
            self.index.setdefault(s, []).append(number)

    def keep(self, text: str, finished: bool = True, opener: str = "") -> bool:
        """Decide on ``text``, count the decision, and remember it when kept."""
        why = self.reason(text, finished, opener)
        self.stats[why or "kept"] += 1
        if why is None:
            self.add(text)
        return why is None
