"""Python client for the AdvFace Guard plug-in: connect, protect batches, stream enrollments."""

from advface_client.client import GuardClient, TLSConfig
from advface.codec import BatchError, FaceStat, Options, Result

__all__ = ["BatchError", "FaceStat", "GuardClient", "Options", "Result", "TLSConfig"]
