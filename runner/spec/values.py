"""The spec's plain value types, shared by the checker and the parser (a leaf: it imports nothing of runner's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Params = tuple[tuple[str, Any], ...]  # sorted (name, value) pairs: frozen and hashable
DEFAULT_CONFIG = "1:1"  # when image_configs is absent: one square image at the model's default size


@dataclass(frozen=True)
class ImageConfig:
    aspect_ratio: str | None  # None: none is sent, and the model keeps its first input image's shape
    image_size: str | None = None

    def as_sent(self) -> dict[str, str]:
        """The `image_config` object exactly as the request carries it (only the keys given)."""
        d: dict[str, str] = {}
        if self.aspect_ratio is not None:
            d["aspect_ratio"] = self.aspect_ratio
        if self.image_size is not None:
            d["image_size"] = self.image_size
        return d
