"""AdvFace Guard: a gRPC privacy plug-in that turns facial features into adversarial features."""

__version__ = "0.1.0"
