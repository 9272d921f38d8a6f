"""How much `gramine-sgx-sign` must hash for the `privlora tee manifest` of a config: trusted entries,
files and bytes after expanding folders the way the signer does (recursively, symlinked folders not
descended, only regular readable files), by category. Also the time to build the manifest.

Run: python benchmarks/tee_manifest.py [configs/demo-dp.yaml ...]  → benchmarks/results/tee_manifest.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from privlora.tee import TeeOptions, build_manifest

ROOT = Path(__file__).resolve().parents[1]


def expand(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path] if path.is_file() else []
    out = []
    for child in sorted(path.glob("*")):
        if not (child.is_file() or child.is_dir()) or not os.access(child, os.R_OK):
            continue
        if child.is_dir() and child.is_symlink():
            continue
        out.extend(expand(child))
    return out


def category(uri: str, plan) -> str:
    if "/site-packages/" in uri or "/dist-packages/" in uri:
        return "site-packages"
    if uri.startswith(str(Path(sys.base_prefix))) or uri.startswith(str(Path(sys.prefix))):
        return "python (interpreter, stdlib)"
    if uri.startswith(("/lib/", "/usr/lib/")) and "gramine" not in uri:
        return "system libraries"
    if uri.startswith(str(plan.gramine_dir)):
        return "gramine runtime"
    return "privlora, base, config"


def measure(config: Path) -> dict:
    t = time.time()
    plan = build_manifest(TeeOptions(config=config, output=Path("/tmp/bench.manifest")))
    seconds = time.time() - t
    cats: dict[str, dict[str, int]] = {}
    seen: set[Path] = set()
    for entry in plan.manifest["sgx"]["trusted_files"]:
        uri = entry["uri"][len("file:"):]
        c = cats.setdefault(category(uri, plan), {"entries": 0, "files": 0, "bytes": 0})
        c["entries"] += 1
        for f in expand(Path(uri)):
            if f in seen:
                continue
            seen.add(f)
            c["files"] += 1
            c["bytes"] += f.stat().st_size
    total = {k: sum(c[k] for c in cats.values()) for k in ("entries", "files", "bytes")}
    return {"config": str(config.relative_to(ROOT)), "build_seconds": round(seconds, 2),
            "gramine_found": plan.gramine_found, "total": total, "by_category": cats}


def main() -> None:
    configs = [Path(a).resolve() for a in sys.argv[1:]] or [ROOT / "configs/demo-dp.yaml",
                                                            ROOT / "configs/text-plain.yaml"]
    results = [measure(c) for c in configs]
    out = ROOT / "benchmarks/results/tee_manifest.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        t = r["total"]
        print(f"{r['config']}: {t['entries']} entries → {t['files']} files, {t['bytes'] / 2**30:.2f} GiB "
              f"(built in {r['build_seconds']} s)")
        for name, c in r["by_category"].items():
            print(f"  {name:<30} {c['entries']:>4} entries {c['files']:>6} files {c['bytes'] / 2**20:>8.0f} MiB")


if __name__ == "__main__":
    main()
