"""Image metadata: what a file carries besides its pixels, and a copy that carries nothing else.

Stripping is done by re-encoding the pixels into a fresh image, never by deleting known tags: whatever
a camera, editor or phone wrote (EXIF with GPS and serial numbers, XMP, IPTC, JPEG comments, PNG text
chunks, maker notes, an ICC profile's description strings) is simply not copied. The EXIF orientation
is applied to the pixels first and an embedded ICC profile is converted to sRGB, so the copy looks the
same as the original without them.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps

from privlora.data.formats import to_8bit
from privlora.data.sanitize.report import Finding

_GPS_IFD, _EXIF_IFD = 0x8825, 0x8769
_SERIALS = {"BodySerialNumber", "LensSerialNumber", "CameraSerialNumber", "SerialNumber", "CameraOwnerName",
            "OwnerName", "Artist", "Copyright", "ImageUniqueID"}
#: PIL ``info`` keys that hold metadata (not decoding parameters such as dpi or transparency)
_INFO_BLOCKS = {"exif": "EXIF", "xmp": "XMP", "XML:com.adobe.xmp": "XMP", "photoshop": "IPTC/Photoshop",
                "icc_profile": "ICC profile", "comment": "comment", "mp": "MPO"}


def _exif_findings(img: Image.Image) -> list[Finding]:
    exif = img.getexif()
    if not exif and "exif" not in img.info:
        return []
    tags = {ExifTags.TAGS.get(k, hex(k)) for k in exif}
    try:
        sub = exif.get_ifd(_EXIF_IFD)
        tags |= {ExifTags.TAGS.get(k, hex(k)) for k in sub}
    except (KeyError, ValueError, OSError):  # malformed sub-IFD: still stripped, just not itemised
        pass
    found = []
    try:
        gps = exif.get_ifd(_GPS_IFD)
    except (KeyError, ValueError, OSError):
        gps = {}
    if gps:
        names = sorted(ExifTags.GPSTAGS.get(k, hex(k)) for k in gps)
        found.append(Finding("metadata", "GPS location", "pillow", {"field": "EXIF GPS", "tags": names}, "stripped"))
    serials = sorted(tags & _SERIALS)
    if serials:
        found.append(Finding("metadata", "identifying EXIF", "pillow", {"field": "EXIF", "tags": serials},
                             "stripped"))
    rest = sorted(t for t in tags - _SERIALS if t not in ("GPSInfo", "ExifOffset"))
    if rest:
        found.append(Finding("metadata", "EXIF", "pillow", {"field": "EXIF", "tags": rest}, "stripped"))
    return found


def findings(img: Image.Image) -> list[Finding]:
    """Every metadata block in ``img`` (names of tags and chunks, never their values)."""
    found = _exif_findings(img)
    seen = {"EXIF"}
    for key, label in _INFO_BLOCKS.items():
        if key in img.info and label not in seen and img.info[key]:
            seen.add(label)
            found.append(Finding("metadata", label, "pillow", {"field": key}, "stripped"))
    text_chunks = sorted(k for k in getattr(img, "text", {}) or {} if k not in _INFO_BLOCKS)
    if text_chunks:
        found.append(Finding("metadata", "PNG text", "pillow", {"field": "tEXt/iTXt/zTXt", "tags": text_chunks},
                             "stripped"))
    if getattr(img, "applist", None):  # JPEG APPn segments Pillow does not parse (maker apps, Ducky, …)
        apps = sorted({marker for marker, _ in img.applist if marker not in ("APP0", "APP1", "APP2", "APP13", "COM")})
        if apps:
            found.append(Finding("metadata", "JPEG application data", "pillow", {"field": "APPn", "tags": apps},
                                 "stripped"))
    return found


def _to_srgb(img: Image.Image) -> Image.Image:
    """Colour-manage an embedded ICC profile into sRGB so dropping the profile keeps the colours."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA"):
        return img
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode=img.mode)
    except (ImageCms.PyCMSError, OSError):  # a broken profile: keep the pixels as they are
        return img


def bare_pixels(img: Image.Image) -> Image.Image:
    """A new image holding only ``img``'s pixels (orientation applied, colours in sRGB), no metadata.

    Modes are normalised to L, RGB or RGBA: what every encoder writes and the trainer reads.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    elif img.mode in ("LA",):
        img = img.convert("RGBA")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = to_8bit(img)  # the same depth mapping as the training loader
    elif img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, 1-bit …
    img = _to_srgb(img)
    return Image.fromarray(np.array(img))


#: how each format is re-encoded: high quality, and nothing but pixels
_SAVE: dict[str, dict[str, Any]] = {
    "JPEG": {"quality": 95, "subsampling": 0},
    "PNG": {},
    "WEBP": {"quality": 95},
    "TIFF": {"compression": "tiff_lzw"},
    "BMP": {},
    "GIF": {},
}
FORMAT_BY_SUFFIX = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF",
                    ".tiff": "TIFF", ".bmp": "BMP", ".gif": "GIF"}


def encode(img: Image.Image, suffix: str) -> bytes:
    """``img`` encoded in the format its file name says (no metadata of any kind)."""
    fmt = FORMAT_BY_SUFFIX[suffix.lower()]
    if fmt in ("JPEG", "BMP") and img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **_SAVE[fmt])
    return buf.getvalue()
