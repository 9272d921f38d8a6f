"""``privlora synthesize``: a replacement dataset generated from a (DP-trained) adapter, and its audit.

* :mod:`.core`       — ``synthesize()``: load the run, sample, write an image folder with captions,
                        ``privacy.json`` (the source's guarantee, carried over by post-processing) and
                        ``synthesize.json`` (what produced it), atomically.
* :mod:`.samplers`   — how each kind of base samples (pixel UNet: DDIM; SD: the diffusers pipeline;
                        SD + ControlNet), one registry.
* :mod:`.conditions` — ControlNet folders (safetensors only) and condition images (given, or Canny edges).
* :mod:`.measure`    — membership / extraction audit of the synthetic set against the source's
                        members and evaluation non-members, and the utility of training on it.

Imports flow ``data → tasks → train → generate → audit → synthesize``: it reuses the audit's tiled ℓ2,
Carlini's normalised distance and the metrics, and nothing below it imports it.
"""

from privlora.synthesize.core import synthesize
from privlora.synthesize.measure import nearest_synthetic_audit

__all__ = ["nearest_synthetic_audit", "synthesize"]
