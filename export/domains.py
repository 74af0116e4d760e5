"""Text domains for judging early ranking on text calibration never saw: ``(query, passage)`` pairs per source.

A schedule is calibrated on one source and must keep the full model's top-K on others. Each domain turns a text
source into pairs of a short query and the passage it came from; :func:`domain_queries` samples query sets from
them (each query with its own passage and passages of other pairs of the same domain), as calibration does.

* ``builtin``    — docstrings of the calibration modules (what ``edge-sel calibrate`` uses by default);
* ``docstrings`` — docstrings of the benchmark modules (same kind of text, disjoint passages);
* ``botchan``    — Project Gutenberg's *Botchan* (fiction): a window's first sentence, the window's rest;
* ``wordnet``    — WordNet 3.0 glosses (dictionary definitions): "What is (a) LEMMA?", the synset's gloss.

Passages are capped at :data:`MAX_WORDS` words (about 130 tokens), the length of the rerank benchmark's passages.
"""

from __future__ import annotations

import re
from functools import lru_cache

from edge_sel.runtime.errors import InputError

MAX_WORDS = 90
DOMAINS = ("builtin", "docstrings", "botchan", "wordnet")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _cap(text: str, max_words: int = MAX_WORDS) -> str:
    words = text.split()
    return " ".join(words[:max_words])


def botchan_pairs(window_words: int = 80) -> list[tuple[str, str]]:
    """Consecutive windows of *Botchan*: the first sentence (6-40 words) as query, the rest of the window as passage."""
    from .textdata import botchan

    text = botchan()
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", text)
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    words = text[start.end() if start else 0: end.start() if end else len(text)].split()
    pairs = []
    for p in range(0, len(words) - window_words, window_words):
        window = " ".join(words[p:p + window_words])
        sentences = _SENTENCE_END.split(window)
        # the window starts mid-sentence: skip the fragment, take the next whole sentence as the query
        if len(sentences) < 3:
            continue
        query, rest = sentences[1], " ".join(sentences[2:])
        if 6 <= len(query.split()) <= 40 and len(rest.split()) >= 40:
            pairs.append((query, _cap(rest)))
    return pairs


def wordnet_pairs(min_words: int = 10) -> list[tuple[str, str]]:
    """WordNet glosses of at least ``min_words`` words whose lemma does not occur in them: "What is LEMMA?" -> gloss."""
    from .textdata import wordnet_glosses

    pairs, seen = [], set()
    for lemma, gloss in wordnet_glosses():
        if len(gloss.split()) < min_words or lemma.lower() in gloss.lower() or lemma in seen:
            continue
        seen.add(lemma)
        article = "an" if lemma[0].lower() in "aeiou" else "a"
        pairs.append((f"What is {article} {lemma}?", _cap(gloss)))
    return pairs


@lru_cache(maxsize=8)
def domain_pairs(domain: str) -> tuple[tuple[str, str], ...]:
    """``(query, passage)`` pairs of ``domain`` (one of :data:`DOMAINS`), deterministic order."""
    if domain == "builtin":
        from .passes.calibrate import calibration_items

        pairs = [(q, _cap(p)) for q, p in calibration_items()]
    elif domain == "docstrings":
        from .textdata import docstring_pairs

        pairs = [(q, _cap(p)) for q, p in docstring_pairs()]
    elif domain == "botchan":
        pairs = botchan_pairs()
    elif domain == "wordnet":
        pairs = wordnet_pairs()
    else:
        raise InputError(f"unknown text domain {domain!r} (known: {', '.join(DOMAINS)})")
    return tuple(pairs)


def domain_queries(domain: str, n_queries: int, n_candidates: int, seed: int = 1) -> list[tuple[str, list[str]]]:
    """``n_queries`` seeded queries of ``domain``, each with its own passage among ``n_candidates`` of that domain."""
    from .passes.calibrate import sample_queries

    pairs = list(domain_pairs(domain))
    if len(pairs) < n_candidates:
        raise InputError(f"domain {domain!r} has only {len(pairs)} passages, fewer than {n_candidates} candidates per query")
    return sample_queries(pairs, n_queries, n_candidates, seed)
