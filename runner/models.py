"""What each Nano Banana model accepts, how big its images are, and what it costs."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Source: ../shared/nanobanana-api.md, compiled from Google's Gemini image-generation and
# pricing pages (list prices per image, standard mode, as of 2025-12). The gateway's own
# prices are not published: every price can be overridden by the spec's `pricing`.
BASE_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")

# Pixel sizes at 1K for Pro and 2 (2K doubles each side, 4K quadruples it).
PIXELS_1K: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (848, 1264),
    "3:2": (1264, 848),
    "3:4": (896, 1200),
    "4:3": (1200, 896),
    "4:5": (928, 1152),
    "5:4": (1152, 928),
    "9:16": (768, 1376),
    "16:9": (1376, 768),
    "21:9": (1584, 672),
    # Inferred for nanobanana_2's extra ratios: same ~1 megapixel budget.
    "1:4": (512, 2048),
    "4:1": (2048, 512),
    "1:8": (352, 2816),
    "8:1": (2816, 352),
}
SIZE_SCALE = {"512": 0.5, "1K": 1.0, "2K": 2.0, "4K": 4.0}


@dataclass(frozen=True)
class ModelInfo:
    id: str
    google_model: str
    aspect_ratios: tuple[str, ...]
    sizes: tuple[str, ...]  # empty: the model takes no image_size
    default_size: str  # what the model produces when image_size is left out
    tokens: dict[str, int]  # output tokens per image, by size
    price_usd: dict[str, float]  # list price per image, by size
    latency_s: float  # typical seconds per image, for time estimates
    input_image_usd: float  # a reference image, billed as input tokens (inferred: tokens per image x input price)


MODELS: dict[str, ModelInfo] = {
    "nanobanana": ModelInfo(
        id="nanobanana",
        google_model="gemini-2.5-flash-image",
        aspect_ratios=BASE_RATIOS,
        sizes=(),
        default_size="1K",
        tokens={"1K": 1290},
        price_usd={"1K": 0.039},
        latency_s=8.0,
        input_image_usd=0.0001,  # ~258 tokens at $0.30 / M
    ),
    "nanobanana_pro": ModelInfo(
        id="nanobanana_pro",
        google_model="gemini-3-pro-image-preview",
        aspect_ratios=BASE_RATIOS,
        sizes=("1K", "2K", "4K"),
        default_size="1K",
        tokens={"1K": 1120, "2K": 1120, "4K": 2000},
        price_usd={"1K": 0.134, "2K": 0.134, "4K": 0.24},
        latency_s=18.0,
        input_image_usd=0.0011,  # ~560 tokens at $2 / M
    ),
    "nanobanana_2": ModelInfo(
        id="nanobanana_2",
        google_model="gemini-3.1-flash-image-preview",
        aspect_ratios=(*BASE_RATIOS, "1:4", "4:1", "1:8", "8:1"),
        sizes=("512", "1K", "2K", "4K"),
        default_size="1K",
        tokens={"512": 747, "1K": 1120, "2K": 1680, "4K": 2520},
        price_usd={"512": 0.045, "1K": 0.067, "2K": 0.101, "4K": 0.151},
        latency_s=20.0,
        input_image_usd=0.0003,  # ~560 tokens at $0.50 / M
    ),
}


def effective_size(model: str, image_size: str | None) -> str:
    """The size a request actually produces (and is billed at)."""
    info = MODELS[model]
    if not info.sizes or image_size is None:
        return info.default_size
    return image_size


def pixel_size(model: str, aspect_ratio: str, image_size: str | None) -> tuple[int, int]:
    """Width and height of the image the real API returns for this request."""
    if model == "nanobanana":
        return (1344, 768) if aspect_ratio == "16:9" else PIXELS_1K[aspect_ratio]
    w, h = PIXELS_1K[aspect_ratio]
    scale = SIZE_SCALE[effective_size(model, image_size)]
    return round(w * scale), round(h * scale)


def nearest_ratio(model: str, width: int, height: int) -> str:
    """The aspect ratio `model` supports that is nearest to width:height (on a log scale): what an
    image config without `aspect_ratio` gets when its first reference image is this shape."""
    target = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = (int(x) for x in ratio.split(":"))
        return abs(math.log(w / h) - target)

    return min(MODELS[model].aspect_ratios, key=distance)
