"""The ComfyUI client: one backend's REST calls and event socket (`client`), and the shapes of what
ComfyUI sends, each checked in one place (`shapes`)."""

from .client import (
    DIALECTS,
    BackendUnavailable,
    ComfyClient,
    MalformedAnswer,
    PromptRefused,
    ResultTooLarge,
)

__all__ = ["DIALECTS", "BackendUnavailable", "ComfyClient", "MalformedAnswer", "PromptRefused", "ResultTooLarge"]
