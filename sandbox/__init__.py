"""A faithful fake Bitrix24 cloud over loopback HTTP: see sandbox/README.md."""

from .client import SandboxControl, SandboxError
from .server import SandboxServer

__all__ = ["SandboxServer", "SandboxControl", "SandboxError"]
