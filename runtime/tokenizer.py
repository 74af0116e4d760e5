"""The bundle's tokenizer (``tokenizers`` only): no padding, no truncation, and the chat template.

A prompt longer than the model's context is refused by the engine, never cut here. The chat template
is the bundle's pre-rendered one (``before`` + prompt + ``after``, or with a system message
``system_before`` + system + ``system_between`` + prompt + ``after``), so no template engine runs.
"""

from __future__ import annotations

from tokenizers import Tokenizer as _HFTokenizer

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import InputError


class Tokenizer:
    def __init__(self, bundle: Bundle):
        self.source = bundle.root
        self.tok = _HFTokenizer.from_file(str(bundle.path(bundle.spec.tokenizer.file)))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.chat = bundle.spec.chat

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat(self, prompt: str, system: str | None = None) -> str:
        """``prompt`` (and ``system``) wrapped in the bundle's chat template."""
        c = self.chat
        if not c:
            raise InputError(f"{self.source} has no chat template; run without --chat")
        if system is not None and c.system_before is not None:
            return c.system_before + system + c.system_between + prompt + c.after
        return c.before + prompt + c.after

    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """A prompt's ids: through the chat template (its special tokens are in the text), or with the
        tokenizer's own special tokens."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt is empty")
        if chat:
            return self.encode(self.apply_chat(prompt, system), add_special_tokens=False)
        return self.encode(prompt, add_special_tokens=True)
