"""A local stand-in for the Nano Banana chat-completions gateway (or LiteLLM in front of Gemini), failures included."""

from .config import MockConfig
from .faults import FAULT_KINDS
from .images import PNG_SIGNATURE, data_uri, pillow_available, render_image
from .server import MockGateway, serve
from .validate import request_digest

__all__ = [
    "FAULT_KINDS",
    "PNG_SIGNATURE",
    "MockConfig",
    "MockGateway",
    "data_uri",
    "pillow_available",
    "render_image",
    "request_digest",
    "serve",
]
