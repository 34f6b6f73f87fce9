"""The client library's former name: `comfybridge.client` is `comfybridge.sdk`, kept importable for one
release."""

from .sdk import *  # noqa: F403
from .sdk import __all__ as __all__
