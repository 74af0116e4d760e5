from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Policy


@dataclass
class Full(Policy):
    """No eviction, no selection: the reference every other policy is judged against.

    The cache must hold the prompt and every generated token; a smaller budget is refused up front.
    """

    name: ClassVar[str] = "full"
    min_tokens: ClassVar[int] = 1
    evicts: ClassVar[bool] = False
