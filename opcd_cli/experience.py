"""Experience items: the ``- EXPERIENCE ITEM: ...`` lines that ``opcd extract`` writes and ``opcd distill`` distils.

Plain text helpers with no model in sight, shared by the extraction loop and the toy world's pretraining
(which must show its models attempts exactly as ``opcd extract`` does).
"""

from __future__ import annotations

import re

ITEM_PREFIX = "- EXPERIENCE ITEM: "
ITEM_LINE = re.compile(r"^\s*-\s*EXPERIENCE ITEM:\s*(.+?)\s*$", re.IGNORECASE)


def parse_items(text: str) -> list[str]:
    """The bodies of the ``- EXPERIENCE ITEM:`` lines of a text."""
    return [m.group(1) for line in text.splitlines() if (m := ITEM_LINE.match(line))]


def render_items(items) -> str:
    """Items as an experience file's text, one line each."""
    return "\n".join(ITEM_PREFIX + item for item in items)


def trace_line(prompt: str, response: str, right: bool) -> str:
    """One attempt as the extraction prompt shows it: the verdict first, then the problem and the answer."""
    return f"[{'right' if right else 'wrong'}] {prompt} -> {' '.join(response.split())}"


def _words(item: str) -> set[str]:
    return set(re.findall(r"\w+", item.lower()))


def is_near_duplicate(item: str, kept: list[str], threshold: float = 0.8) -> bool:
    """True when ``item`` shares at least ``threshold`` of its words (Jaccard similarity) with a kept item."""
    words = _words(item)
    for other in kept:
        union = words | _words(other)
        if union and len(words & _words(other)) / len(union) >= threshold:
            return True
    return False


def add_items(experience: list[str], candidates: list[str]) -> list[str]:
    """``experience`` followed by the candidates that are not near-duplicates of anything kept, in order."""
    kept = list(experience)
    for item in candidates:
        if not is_near_duplicate(item, kept):
            kept.append(item)
    return kept
