"""What Ray Serve's gRPC proxy imports: the servicer registrations and nothing of the model.

The proxy runs on every node (CPU-only head nodes included) and must answer Serve's
readiness check within seconds, so this module imports only generated stubs, never torch
(importing ``ray_app`` took the proxy 2.4 s on a quiet machine and over a minute on a
loaded one, and Serve killed it as not ready). ``ray_app`` and the deployment file name
these functions; the replicas import this module too (through ``ray_app``).
"""

from __future__ import annotations

import sys
from typing import Any

from riva.client.proto import riva_audio_pb2, riva_tts_pb2, riva_tts_pb2_grpc

GRPC_SERVICER_FUNCTIONS = [
    "qwen3tts_rt.v1.tts_pb2_grpc.add_TextToSpeechServicer_to_server",
    "qwen3tts_rt.server.ray_proxy.add_riva_servicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


RIVA_MESSAGES = (riva_audio_pb2, riva_tts_pb2)  # imported for their classes, aliased below


def _alias_riva_modules() -> None:
    """The proxy pickles each request message to send it to a replica, by class and
    module. The Riva package's generated classes name ``riva.proto.<x>_pb2`` as their
    module, which exists only as ``riva.client.proto.<x>_pb2``: register it under both
    names (in the proxy and in the replicas: both import this module)."""
    prefix = "riva.client.proto."
    for name, mod in list(sys.modules.items()):
        if name.startswith(prefix) and name.endswith("_pb2"):
            sys.modules.setdefault("riva.proto." + name[len(prefix) :], mod)


_alias_riva_modules()


def add_riva_servicer_to_server(servicer: Any, server: Any) -> None:
    """The proxy's registration of the Riva service (a ``grpc_servicer_functions`` entry;
    importing this module first makes Riva's messages picklable)."""
    riva_tts_pb2_grpc.add_RivaSpeechSynthesisServicer_to_server(servicer, server)
