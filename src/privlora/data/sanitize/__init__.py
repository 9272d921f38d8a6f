"""Clean a dataset before training: faces, printed text, metadata, near-duplicates, PII in text.

``sanitize(src, out, options=...)`` is the one entry point; ``privlora sanitize`` calls it.
"""

from privlora.data.sanitize.images import ImageOptions
from privlora.data.sanitize.run import SanitizeOptions, SanitizeResult, TextOptions, sanitize

__all__ = ["ImageOptions", "SanitizeOptions", "SanitizeResult", "TextOptions", "sanitize"]
