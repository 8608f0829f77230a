"""The stagcompile runtime: runs a bundle's stacks concurrently over shared, preallocated caches.

This package is copied into every bundle as `runtime/` and needs only numpy, tokenizers and the
backend's library (onnxruntime, or tensorrt + cuda-python): no torch, no stagcompile.

    python BUNDLE/runtime/run.py --prompt "..."        # or, inside BUNDLE: python -m runtime

    from runtime import Generator, Sampling             # with BUNDLE on sys.path
    gen = Generator.load("BUNDLE")
    tokens = gen.generate(gen.encode(["Hello"]), max_new_tokens=16)
"""

from .bundle import Bundle, BundleError
from .generator import Generator
from .sampling import Sampling
from .scheduler import CapacityError

__all__ = ["Bundle", "BundleError", "Generator", "Sampling", "CapacityError"]
