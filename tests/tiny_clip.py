"""The tiny random CLIP lives in harness.tiny.clip (benchmarks build it too); tests import it from here."""

from harness.tiny.clip import build_tiny_clip

__all__ = ["build_tiny_clip"]
