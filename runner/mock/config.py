"""MockConfig: everything the mock gateway can be told, checked once before it starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..models import MODELS
from .faults import FAULT_KINDS
from .images import pillow_available
from .validate import FLAVORS

RETRY_AFTER_MODES = ("header", "body", "both", "none")
BATCH_FAULT_KINDS = ("failed", "expired", "create_drop", "create_503", "create_429", "missing", "truncate", "duplicate")
ANSWER_FORMATS = ("markdown", "images")


@dataclass(frozen=True)
class MockConfig:
    """How the mock behaves; the defaults answer at once, with small PNGs, and never fail."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    api_key: str | None = None  # None: any non-empty Bearer token is accepted
    latency_s: float = 0.0  # before answering each generation request...
    latency_jitter_s: float = 0.0  # ...plus uniform(0, jitter)
    image_scale: int = 8  # images are the model's pixel size integer-divided by this, at least 8x8
    mime: str = "png"  # png | jpeg | webp (the last two need Pillow)
    pad_bytes: int = 0  # a padding chunk/comment of this size in every image (memory benchmarks)
    rpm_limit: int = 0  # 0: none; else at most max(1, int(rpm_limit * rpm_window_s / 60)) per sliding window
    rpm_window_s: float = 10.0
    retry_after: str = "header"  # how 429s announce the wait: header | body | both | none
    fault_rates: tuple[tuple[str, float], ...] = ()  # random faults: ((kind, probability), ...)
    seed: int = 0  # of the random faults
    fault_retry_after_s: float = 1.0  # the wait injected 429s announce (short, so tests stay fast)
    # nanobanana: the gateway of shared/nanobanana-api.md (image config in extra_body.google);
    # openai-compatible: LiteLLM/OpenRouter in front of Gemini (top-level image_config, no extra_body).
    flavor: str = "nanobanana"
    answer_format: str | None = None  # markdown | images; None: the flavour's (markdown, images)
    # Google's own API (served beside the chat endpoint; `flavor: gemini` makes it the base_url):
    model_ids: dict[str, str] = field(default_factory=lambda: {m: i.google_model for m, i in MODELS.items()})
    batch_latency_s: float = 2.0  # a batch's whole life on the fast clock: PENDING, RUNNING, then its end
    batch_faults: tuple[tuple[str, float], ...] = ()  # (kind, probability): whole batches or results lines
    batch_max_open: int = 100  # open batches at once; past it, create answers 429 (0: no limit)
    batch_max_tokens: int = 0  # tokens enqueued across open batches (e.g. 2_000_000 for Tier 1; 0: no limit)
    state_dir: Path | None = None  # keep files and batches here, so they outlive the process

    def validate(self) -> None:
        if self.mime not in ("png", "jpeg", "webp"):
            raise ValueError(f"mime must be png, jpeg or webp, not {self.mime!r}")
        if self.mime != "png" and not pillow_available():
            raise ValueError(f"mime {self.mime!r} needs Pillow, which is not installed")
        if self.retry_after not in RETRY_AFTER_MODES:
            raise ValueError(f"retry_after must be one of {', '.join(RETRY_AFTER_MODES)}")
        if self.flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}, not {self.flavor!r}")
        if self.answer_format is not None and self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)} or None")
        if self.image_scale < 1 or self.pad_bytes < 0 or self.rpm_limit < 0 or self.rpm_window_s <= 0:
            raise ValueError("image_scale >= 1, pad_bytes >= 0, rpm_limit >= 0, rpm_window_s > 0")
        for kind, rate in self.fault_rates:
            if kind not in FAULT_KINDS or not 0.0 <= rate <= 1.0:
                raise ValueError(f"bad fault rate {kind}={rate}: kinds are {', '.join(FAULT_KINDS)}")
        if sum(rate for _, rate in self.fault_rates) > 1.0:
            raise ValueError("fault rates add up to more than 1")
        for kind, rate in self.batch_faults:
            if kind not in BATCH_FAULT_KINDS or not 0.0 <= rate <= 1.0:
                raise ValueError(f"bad batch fault rate {kind}={rate}: kinds are {', '.join(BATCH_FAULT_KINDS)}")
        if self.batch_latency_s < 0 or self.batch_max_open < 0 or self.batch_max_tokens < 0:
            raise ValueError("batch_latency_s, batch_max_open and batch_max_tokens must be >= 0")

    @property
    def effective_answer_format(self) -> str:
        if self.answer_format is not None:
            return self.answer_format
        return "markdown" if self.flavor in ("nanobanana", "gemini") else "images"
