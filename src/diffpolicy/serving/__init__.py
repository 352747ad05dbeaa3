"""From checkpoint to robot: a gRPC policy server and its client (server.py, client.py), the message
encoding (wire.py) and TorchScript export (export.py).

    from diffpolicy.serving import PolicyClient, RemotePolicy, PolicyServer, ExportedPolicy, export_policy

The names load on first use, so importing this package needs neither gRPC (the `serve` extra) nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PolicyClient": "client",
    "PolicyReply": "client",
    "PolicyServerError": "client",
    "RemotePolicy": "client",
    "PolicyServer": "server",
    "ExportedPolicy": "export",
    "export_policy": "export",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
    except ModuleNotFoundError as e:
        if e.name != "grpc":
            raise
        raise ImportError(
            f"diffpolicy.serving.{name} needs gRPC: pip install 'diffpolicy[serve]' (or grpcio)"
        ) from e
    return getattr(module, name)
