"""Trusted execution: run ``privlora train`` inside an Intel SGX enclave with Gramine.

:func:`write_manifest` turns a train config into a signed-ready Gramine manifest (trusted files,
encrypted mounts for data and outputs, a fixed command line, no network allowances).
"""

from privlora.tee.manifest import KEY_SOURCES, ManifestPlan, TeeOptions, build_manifest, next_steps, write_manifest

__all__ = ["KEY_SOURCES", "ManifestPlan", "TeeOptions", "build_manifest", "next_steps", "write_manifest"]
