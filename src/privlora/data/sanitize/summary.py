"""The terminal summary of a sanitize run: what was found, in how many files, what became of them."""

from __future__ import annotations

from privlora.data.sanitize.run import REPORT, SanitizeResult

_ORDER = ["face", "text", "read-back", "metadata", "duplicate"]


def summary_lines(result: SanitizeResult) -> list[str]:
    counts = result.counts()
    keys = [k for k in _ORDER if k in counts] + sorted(k for k in counts if k not in _ORDER)
    width = max([len(k) for k in keys] + [8])
    lines = [f"{'found':<{width}}  {'files':>6}  {'items':>6}"]
    lines += [f"{k:<{width}}  {counts[k]['files']:>6}  {counts[k]['items']:>6}" for k in keys]
    if not keys:
        lines.append("(nothing found)")
    checked = result.read_back()
    if checked is not None:
        lines.append(f"read-back: {checked['images']} images re-read in {checked['seconds']:.1f} s, "
                     f"{checked['misses']} missed words re-redacted in {checked['images_with_misses']} images"
                     + (f"; still legible in {len(checked['still_legible'])} (see the report)"
                        if checked["still_legible"] else ""))
    statuses = result.statuses()
    lines.append("files: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))
    skipped = [r for r in result.files if r.status == "skipped"]
    for r in skipped[:5]:
        lines.append(f"  skipped {r.path}: {r.reason}")
    if len(skipped) > 5:
        lines.append(f"  … {len(skipped) - 5} more skipped (see the report)")
    if result.out is not None:
        lines.append(f"wrote {result.out} and {result.out / REPORT}")
    else:
        lines.append("dry run: nothing written")
    return lines
