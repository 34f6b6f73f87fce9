"""A stand-in for an unmodified ComfyUI 0.3.x: the recorded REST and WebSocket protocol, no GPU."""

from .engine import Faults
from .server import Emulator, create_emulator_app

__all__ = ["Emulator", "Faults", "create_emulator_app"]
