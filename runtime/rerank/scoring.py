"""How a bundle's scoring mode turns token sequences into scores: one strategy class per mode, chosen once.

* :class:`CrossEncoderScoring` — query and document in one sequence; the head maps the pooled state to a score.
* :class:`BiEncoderScoring` — query and documents encoded separately (the query is one more item); the head
  maps pooled states to embeddings and the score is their dot product.
* :class:`YesNoScoring` — a decoder reads a prompt around each document; the head turns the last token's state
  into the yes-vs-no logit. Bundles with split layer graphs run the shared prompt prefix once (:mod:`.prefix`).

A strategy knows how the text is tokenized, which items run through the layers, how hidden states are pooled,
how the head's output becomes scores, and what an intermediate layer's score is (for early ranking):
``head`` applies the bundle's own head to an intermediate pooled state ("logit lens"), ``cosine`` compares a
bi-encoder document with the query pooled at the same layer, ``probe`` is a per-layer linear probe fitted at
calibration (ridge) on :meth:`Scoring.probe_features`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge_sel.runtime.errors import InputError

from .prefix import is_split

if TYPE_CHECKING:
    from .text import Encoded, TextEncoder


def _cls(hidden: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return hidden[:, 0, :]


def _last(hidden: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if hidden.shape[1] == 1:  # one token per row (e.g. the final layer ran for the last token only)
        return hidden[:, 0, :]
    return hidden[np.arange(len(lengths)), lengths - 1, :]


def _mean(hidden: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None]
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


POOLINGS = {"cls": _cls, "last": _last, "mean": _mean}


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_scores(pooled: np.ndarray, query_pooled: np.ndarray) -> np.ndarray:
    return unit(pooled) @ unit(query_pooled)


def apply_probe(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """A linear probe stored as ``[F + 1]`` (weights, then bias) applied to ``[N, F]`` features."""
    return features @ weights[:-1] + weights[-1]


def rms_features(pooled: np.ndarray) -> np.ndarray:
    """Pooled states divided by their RMS (decoder residual streams grow with depth)."""
    pooled = np.asarray(pooled, dtype=np.float32)
    rms = np.sqrt(np.mean(pooled.astype(np.float64) ** 2, axis=-1, keepdims=True))
    return (pooled / np.maximum(rms, 1e-12)).astype(np.float32)


class Scores:
    """Collects the head's output chunk by chunk for one call; :meth:`result` gives one score per document."""

    def __init__(self, n_items: int):
        self.out = np.zeros(n_items, dtype=np.float32)

    def add(self, items: np.ndarray, head_out: np.ndarray) -> None:
        self.out[items] = head_out

    def result(self) -> np.ndarray:
        return self.out


class EmbeddingScores(Scores):
    """Bi-encoders: the head's outputs are embeddings; the last item is the query."""

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.emb: np.ndarray | None = None

    def add(self, items: np.ndarray, head_out: np.ndarray) -> None:
        if self.emb is None:
            self.emb = np.zeros((self.n_items, head_out.shape[1]), dtype=np.float32)
        self.emb[items] = head_out

    def result(self) -> np.ndarray:
        return self.emb[:-1] @ self.emb[-1]


class Scoring:
    """The common part of the strategies: pooling from the bundle, the head session, items = the documents."""

    name = ""
    early_methods: tuple[str, ...] = ("probe", "head")  # how an intermediate layer can be scored
    query_item = False     # the query runs through the layers as one more item (after the documents)
    collector = Scores

    def __init__(self, bundle, head_session=None):
        self.pooling = bundle.spec.pooling
        self._pool = POOLINGS[self.pooling]
        self.head = head_session

    @property
    def reads_last_token(self) -> bool:
        """The head reads one token per candidate, the last one."""
        return self.pooling == "last"

    @staticmethod
    def encode(encoder: "TextEncoder", query: str, documents: list[str], instruction: str | None) -> "Encoded":
        raise NotImplementedError

    def items(self, enc: "Encoded") -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Token ids (and token types) of every item that runs through the layers."""
        ids = list(enc.doc_ids)
        types = list(enc.doc_types) if enc.doc_types is not None else None
        return ids, types

    def pool(self, hidden: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._pool(hidden, lengths, mask)

    def run_head(self, pooled: np.ndarray) -> np.ndarray:
        return self.head.run(None, {"pooled": np.ascontiguousarray(pooled, dtype=np.float32)})[0]

    def layer_scores(self, pooled: np.ndarray, query_pooled: np.ndarray | None = None) -> np.ndarray:
        """An intermediate layer's score without a probe: the bundle's own head on the pooled state (logit lens)."""
        return np.asarray(self.run_head(pooled), dtype=np.float64).reshape(len(pooled))

    @staticmethod
    def probe_features(pooled: np.ndarray, query_pooled: np.ndarray | None = None) -> np.ndarray:
        """The probe's input features for one layer."""
        return rms_features(pooled)

    @classmethod
    def check_method(cls, method: str, where) -> None:
        """Refuse an early-ranking method this scoring mode cannot use."""
        if method == "cosine":
            raise InputError(f"{where}: method 'cosine' needs a bi-encoder bundle, this one scores {cls.name!r}")


class CrossEncoderScoring(Scoring):
    name = "cross_encoder"

    @staticmethod
    def encode(encoder, query, documents, instruction):
        return encoder.encode_pairs(query, documents)


class BiEncoderScoring(Scoring):
    name = "bi_encoder"
    early_methods = ("probe", "cosine")
    query_item = True
    collector = EmbeddingScores

    @staticmethod
    def encode(encoder, query, documents, instruction):
        return encoder.encode_single(query, documents)

    def items(self, enc):
        ids, types = super().items(enc)
        ids.append(enc.query_ids)  # the query is encoded by the same layers, as the last item
        return ids, types

    def layer_scores(self, pooled, query_pooled=None):
        """Cosine between each document and the query pooled at the same layer."""
        return cosine_scores(pooled, query_pooled).astype(np.float64)

    @staticmethod
    def probe_features(pooled, query_pooled=None):
        """``normalize(doc) * normalize(query)`` element-wise: the probe is a learned weighted cosine."""
        if query_pooled is None:
            raise ValueError("bi-encoder probe features need the query's pooled state at the same layer")
        return unit(pooled) * unit(query_pooled)[None, :]

    @classmethod
    def check_method(cls, method, where):
        if method == "head":
            raise InputError(f"{where}: use method 'cosine' (or 'probe') for a bi-encoder bundle")


class YesNoScoring(Scoring):
    name = "yes_no"

    def __init__(self, bundle, head_session=None):
        super().__init__(bundle, head_session)
        self.split = is_split(bundle)

    @staticmethod
    def encode(encoder, query, documents, instruction):
        return encoder.encode_prompt(query, documents, instruction)

    def items(self, enc):
        if self.split:  # candidates carry only their own tokens; the prefix runs once
            return [x[enc.prefix_len:] for x in enc.doc_ids], None
        return super().items(enc)


SCORINGS: dict[str, type[Scoring]] = {s.name: s for s in (CrossEncoderScoring, BiEncoderScoring, YesNoScoring)}


def scoring_class(bundle) -> type[Scoring]:
    """The strategy class for ``bundle``'s scoring mode."""
    return SCORINGS[bundle.scoring]


def scoring_for(bundle, head_session=None) -> Scoring:
    """The strategy for ``bundle``, using ``head_session`` (the bundle's head graph) for head outputs."""
    return scoring_class(bundle)(bundle, head_session)


class LayerScorer:
    """Scores the live candidates at an intermediate layer with a schedule's method."""

    def __init__(self, bundle, schedule, scoring: Scoring):
        self.scoring = scoring
        self.weights = np.array(bundle.array(schedule.probe)) if schedule.method == "probe" else None

    def __call__(self, layer: int, pooled: np.ndarray, query_pooled: np.ndarray | None = None) -> np.ndarray:
        if self.weights is not None:
            return apply_probe(self.weights[layer], self.scoring.probe_features(pooled, query_pooled)).astype(np.float64)
        return self.scoring.layer_scores(pooled, query_pooled)
