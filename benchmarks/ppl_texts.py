"""The perplexity benchmark's texts and windows, fixed here so that no default can be tuned to the windows it is judged on.

Two public-domain books, each shipped inside a package from the Python package index (no other download):

* Project Gutenberg's *Botchan* (Natsume Soseki, tr. Mori), ``test/botchan.txt`` of sentencepiece's sdist
  (:func:`edge_sel.export.textdata.botchan`);
* Lewis Carroll's *Alice's Adventures in Wonderland* (Project Gutenberg's Millennium Fulcrum Edition 2.9),
  ``tests/testdata/alice29.txt`` of Brotli's sdist (the Canterbury corpus file), :func:`alice`.

A window is ``PREFIX`` tokens compressed and the ``CONT`` tokens after them teacher-forced over the compressed
cache. 8 windows on *Botchan*, 4 on *Alice*, spread evenly over each book (skipping its first and last pages) and alternate between the
**tune** half (every default is chosen there) and the **held** half (every claim is made there).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

PREFIX = 1792
CONT = 256
BROTLI_SDIST = "brotli==1.2.1"

# (book, first token, last token a window may reach, windows); window i starts evenly between the two
SPREAD = {"botchan": (1500, 65800, 8), "alice": (600, 37000, 4)}  # Botchan's story ends at token ~65,860


@dataclass(frozen=True)
class Window:
    book: str
    start: int   # first token of the prefix in the book's token ids (no BOS)
    split: str   # "tune" or "held"

    @property
    def name(self) -> str:
        return f"{self.book}@{self.start}"


def alice() -> str:
    """*Alice's Adventures in Wonderland* (public domain), ``tests/testdata/alice29.txt`` of Brotli's sdist (cached).
    The corpus file has DOS line ends and an end-of-file byte; the text is plain ASCII."""
    from edge_sel.export.textdata import text_from_sdist

    text = text_from_sdist("alice29.txt", BROTLI_SDIST, ("tests/testdata/alice29.txt",))
    return text.replace("\r\n", "\n").rstrip("\x1a")


def book_text(book: str) -> str:
    from edge_sel.export.textdata import botchan

    return {"botchan": botchan, "alice": alice}[book]()


def windows(split: str = "held") -> list[Window]:
    """The fixed windows of ``split`` ("tune", "held" or "all"); even-numbered windows of a book tune, odd ones are
    held out. The books take turns in the list, so a run cut short still has windows of both. ``"extra"``: a
    robustness check neither half used, the midpoints between consecutive windows (every other one: 3 on *Botchan*,
    2 on *Alice*), fixed before any of them was measured; they overlap no other window."""
    per_book = []
    for book, (lo, hi, n) in SPREAD.items():
        step = (hi - (PREFIX + CONT) - lo) // (n - 1)
        if split == "extra":
            mids = [i for i in range(n - 1) if i % 2 == (book == "botchan")]
            per_book.append([Window(book, lo + i * step + step // 2, "extra") for i in mids])
            continue
        wins = [Window(book, lo + i * step, "tune" if i % 2 == 0 else "held") for i in range(n)]
        per_book.append([w for w in wins if split in ("all", w.split)])
    return [w for turn in itertools.zip_longest(*per_book) for w in turn if w is not None]


def window_ids(encode, wins: list[Window], bos: int | None = None) -> dict[str, dict]:
    """``{window name: {"prefix": ids, "cont": ids, "book", "split"}}``; ``encode(text)`` -> ids without special tokens;
    the prefix starts with ``bos`` when given (``PREFIX`` tokens in all). Refuses a window past its book's end."""
    books: dict[str, list[int]] = {}
    out = {}
    for w in wins:
        ids = books.get(w.book)
        if ids is None:
            ids = books[w.book] = encode(book_text(w.book))
        head = [bos] if bos is not None else []
        n = PREFIX - len(head)  # text tokens in the prefix; the continuation follows them directly
        seg = ids[w.start:w.start + n + CONT]
        if len(seg) < n + CONT:
            raise ValueError(f"window {w.name} runs past the end of {w.book} ({len(ids)} tokens)")
        out[w.name] = {"prefix": head + seg[:n], "cont": seg[n:], "book": w.book, "split": w.split}
    return out
