"""KV-cache policies, selectable by name and composable with ``+`` (a static prefill policy + a dynamic
decode-time one, e.g. ``"snapkv+mpcache_dynamic"`` or ``"mpcache+layer_skip"``). Adding a policy: one
module with a small dataclass (on :class:`ScorePolicy` when it scores and evicts, :class:`RecallPolicy`
when it reads evicted tokens back) and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

from typing import Callable

from edge_sel.runtime.errors import InputError

from .adaptive_mix import MPCacheEAMix, mpcache_ea_mix
from .base import Context, Policy, ScorePolicy
from .composite import Composite
from .expected_attention import MPCacheEA, mpcache_ea, mpcache_ea_recall
from .full import Full
from .h2o import H2O
from .knorm import Knorm
from .layer_allocation import MPCacheEAAlloc, mpcache_ea_alloc
from .layer_budget import MPCacheEALayers, mpcache_ea_layers
from .layer_skip import LayerSkip
from .mpcache import MPCacheDynamic, MPCacheStatic, mpcache
from .mpcache_recall import MPCacheRecall, mpcache_recall
from .prompt_distill import PromptDistill
from .prompt_allocation import MPCacheEASurvey, mpcache_ea_survey, mpcache_ea_survey_recall
from .recall import RecallPolicy
from .reconstruction import MPCacheZip, mpcache_zip
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .windowkv import WindowKV

REGISTRY: dict[str, Callable[[], Policy]] = {
    "full": Full,
    "streaming_llm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "knorm": Knorm,
    "mpcache": mpcache,
    "mpcache_static": MPCacheStatic,
    "mpcache_dynamic": MPCacheDynamic,
    "mpcache_recall": mpcache_recall,
    "mpcache_ea": mpcache_ea,
    "mpcache_ea_static": MPCacheEA,
    "mpcache_ea_recall": mpcache_ea_recall,
    "mpcache_ea_layers": mpcache_ea_layers,
    "mpcache_ea_alloc": mpcache_ea_alloc,
    "mpcache_ea_mix": mpcache_ea_mix,
    "mpcache_ea_mix_static": MPCacheEAMix,
    "mpcache_ea_layers_static": MPCacheEALayers,
    "mpcache_ea_alloc_static": MPCacheEAAlloc,
    "mpcache_ea_survey": mpcache_ea_survey,
    "mpcache_ea_survey_static": MPCacheEASurvey,
    "mpcache_ea_survey_recall": mpcache_ea_survey_recall,
    "mpcache_zip": mpcache_zip,
    "mpcache_zip_static": MPCacheZip,
    "windowkv": WindowKV,
    "prompt_distill": PromptDistill,
    "layer_skip": LayerSkip,
}


def policy_label(p: Policy) -> str:
    return p.label if isinstance(p, Composite) else p.name


def make_policy(spec: "str | Policy | None") -> Policy:
    """A policy from a name (``"mpcache"``), a ``+``-composition (``"snapkv+layer_skip"``) or an instance."""
    if spec is None:
        return Full()
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"policy must be a name, got {spec!r}; known: {', '.join(REGISTRY)}")
    names = [s.strip() for s in spec.split("+")]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise InputError(f"unknown policy {unknown[0]!r}; known policies: {', '.join(REGISTRY)} (combine with '+')")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"policy {repeated[0]!r} appears twice in {spec!r}; name each policy once")
    parts = [REGISTRY[n]() for n in names]
    if len(parts) == 1:
        return parts[0]
    if any(isinstance(p, Full) for p in parts):
        raise InputError("'full' keeps everything; it cannot be combined with other policies")
    return Composite(parts=tuple(parts))


__all__ = ["Policy", "ScorePolicy", "RecallPolicy", "Composite", "Context", "REGISTRY", "make_policy", "policy_label",
           "Full", "StreamingLLM", "H2O", "SnapKV", "Knorm", "MPCacheStatic", "MPCacheDynamic", "mpcache", "MPCacheRecall",
           "mpcache_recall", "MPCacheEA", "mpcache_ea", "mpcache_ea_recall", "MPCacheEALayers", "mpcache_ea_layers",
           "MPCacheEAAlloc", "mpcache_ea_alloc", "MPCacheZip", "mpcache_zip", "MPCacheEASurvey", "mpcache_ea_survey", "mpcache_ea_survey_recall",
           "MPCacheEAMix", "mpcache_ea_mix", "WindowKV", "PromptDistill", "LayerSkip"]
