"""What replaces a PII span: a registry of operators, chosen by name (``replace``, ``mask``, ``hash``).

An operator is called with the detected value and its entity type and returns the replacement text.
Adding one is one class with ``@register_operator("name")``.

- ``replace``: the type tag, ``<PERSON>`` — nothing of the value survives.
- ``mask``: every letter and digit becomes ``*``, separators stay (``+** *** **** ****``,
  ``*****.***@*******.***``): the text keeps its layout and each value's shape, which is the point of a
  mask and also what it still reveals (lengths). Use ``replace`` or ``hash`` when lengths matter.
- ``hash``: a salted pseudonym ``<PERSON_3f9a1c2e0b4d>``: HMAC-SHA256 keyed by the salt over the type and a
  normalised value (case folded, whitespace collapsed; separators dropped for numbers, so ``6222 0200 …``
  and ``6222-0200-…`` get one pseudonym), truncated to 12 hex digits (48 bits: collisions unlikely below
  millions of distinct values per type). Same value, type and salt → same pseudonym in every file of a
  dataset; without the salt a pseudonym cannot be reversed by trying candidate values (a phone number has
  only ~10^10 of them, so an unkeyed hash would be no protection). The salt appears in no output or repr.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import unicodedata
from typing import ClassVar

from privlora.errors import UserError

OPERATORS: dict[str, type[Operator]] = {}

#: Types whose separators carry no identity: hashed on letters and digits only.
NUMBER_ENTITIES = frozenset({"CREDIT_CARD", "CN_RESIDENT_ID", "PHONE_NUMBER", "US_SSN", "IBAN_CODE",
                             "US_BANK_NUMBER", "US_ITIN", "US_PASSPORT", "UK_NHS"})
HASH_HEX = 12


def register_operator(name: str):
    """Class decorator: add an operator to :data:`OPERATORS` under ``name``."""

    def add(cls: type[Operator]) -> type[Operator]:
        cls.NAME = name
        OPERATORS[name] = cls
        return cls

    return add


class Operator:
    """Base: ``operator(value, entity) -> replacement``. ``salt`` is only used by operators that need one."""

    NAME: ClassVar[str]

    def __init__(self, *, salt: str | None = None) -> None:
        pass

    def __call__(self, value: str, entity: str) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@register_operator("replace")
class Replace(Operator):
    def __call__(self, value: str, entity: str) -> str:
        return f"<{entity}>"


@register_operator("mask")
class Mask(Operator):
    def __call__(self, value: str, entity: str) -> str:
        return "".join("*" if ch.isalnum() else ch for ch in value)


def normalise(value: str, entity: str) -> str:
    """The form two spellings of one value share: NFKC, case folded, whitespace collapsed (numbers: alnum only)."""
    value = " ".join(unicodedata.normalize("NFKC", value).casefold().split())
    return re.sub(r"[\W_]", "", value) if entity in NUMBER_ENTITIES else value


@register_operator("hash")
class Hash(Operator):
    def __init__(self, *, salt: str | None = None) -> None:
        if salt is not None and not salt:
            raise UserError("the PII hash salt is empty: give a secret string, or none for a random one")
        self._key = salt.encode() if salt is not None else secrets.token_bytes(32)

    def __call__(self, value: str, entity: str) -> str:
        digest = hmac.new(self._key, f"{entity}\x00{normalise(value, entity)}".encode(), hashlib.sha256)
        return f"<{entity}_{digest.hexdigest()[:HASH_HEX]}>"


def make_operator(name: str, *, salt: str | None = None) -> Operator:
    """The operator registered as ``name``; an unknown name is a :class:`UserError` listing the known ones."""
    try:
        cls = OPERATORS[name]
    except KeyError:
        raise UserError(f"unknown PII operator {name!r}; choose one of: {', '.join(sorted(OPERATORS))}") from None
    return cls(salt=salt)
