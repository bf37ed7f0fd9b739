"""Protectors: turn features z into the features the backend stores. AdvFace and its baselines."""

from plugin_service.protect.base import Protection, Protector
from plugin_service.names import PROTECTORS
from plugin_service.protect.registry import ProtectorParams, build_protector

__all__ = ["PROTECTORS", "Protection", "Protector", "ProtectorParams", "build_protector"]
