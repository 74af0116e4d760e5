"""A tokenizer's chat template rendered once at export, so the runtime applies it without Jinja or transformers."""

from __future__ import annotations

from typing import Any

MARK = "\u2063EDGESELMARK\u2063"


def chat_spec(tokenizer) -> dict[str, Any] | None:
    """The template stored as the original Jinja string and rendered around a marker: ``before`` + user text +
    ``after`` (and, when the template takes a system message, ``system_before`` + system text + ``system_between``)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False, add_generation_prompt=True)
        with_sys = tokenizer.apply_chat_template([{"role": "system", "content": MARK + "S"}, {"role": "user", "content": MARK}],
                                                 tokenize=False, add_generation_prompt=True)
    except Exception:  # templates may raise on a system message or on anything they do not expect
        return None
    if text.count(MARK) != 1:
        return None
    before, after = text.split(MARK)
    spec: dict[str, Any] = {"template": template, "before": before, "after": after}
    if with_sys.count(MARK) == 2:
        sys_before, rest = with_sys.split(MARK + "S", 1)
        between = rest.split(MARK)[0]
        spec.update({"system_before": sys_before, "system_between": between})
    return spec


def stop_ids(tokenizer, stop_tokens: tuple[str, ...]) -> list[int]:
    """The end-of-sequence id plus those of ``stop_tokens`` the vocabulary has."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for t in stop_tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id:
            ids.add(int(i))
    return sorted(ids)
