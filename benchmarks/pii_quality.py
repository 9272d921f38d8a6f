"""PII detection quality (per-type recall and precision) and throughput of the text sanitizer.

Issue 5's target: recall ≥ 0.95 for every default entity type with precision ≥ 0.9, measured on synthetic
records with planted entities. Records are filled from templates (medical notes, bank messages, social
posts …) with values drawn by a seeded Faker in varied formats and locales, plus distractors that are not
PII (dates, times, amounts, reference numbers, card-like numbers that fail Luhn) so precision is tested
too. Ground truth is the planted spans.

Two template sets: ``dev`` (used while writing the recognizers) and ``heldout`` (other genres and wording,
written afterwards and not tuned on); the target is judged on ``heldout``. Scoring: a planted span is found
when a prediction of the same type overlaps it by at least half of the longer of the two; a prediction is
correct when it so matches a planted span of its type — one of a different type, or on a distractor, counts
against the precision of the predicted type. Throughput: records/s of ``PiiScrubber.scrub_many`` on a warm
analyzer (loading it is reported apart), single process.

    python benchmarks/pii_quality.py [--records 400] [--seed 0]

Writes benchmarks/results/pii_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import time
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "pii_quality.json"
TARGET_RECALL, TARGET_PRECISION = 0.95, 0.9

DEV = [
    # medical notes
    "Patient {PERSON}, {AGE}, admitted on {DATE} with chest pain. Resident ID {CN_RESIDENT_ID}. "
    "Contact: {PHONE_NUMBER}. Lives in {LOCATION}.",
    "Discharge summary for {PERSON} (SSN {US_SSN}). Follow-up with Dr. {PERSON} in two weeks. "
    "Questions: {EMAIL_ADDRESS}.",
    "Referral: {PERSON} was seen at the {LOCATION} clinic on {DATE}. BP 130/85, HR 72. Portal: {URL}",
    "Pt {PERSON} reports nausea since {DATE}. Allergies: penicillin. Emergency contact {PERSON}, tel {PHONE_NUMBER}.",
    "Lab results for {PERSON}: HbA1c 7.2%, LDL 3.1 mmol/L. Sent to {EMAIL_ADDRESS} from {IP_ADDRESS}.",
    # bank messages
    "Dear {PERSON}, a payment of {AMOUNT} was made with your card {CREDIT_CARD} on {DATE}. "
    "Not you? Call {PHONE_NUMBER}.",
    "Transfer of {AMOUNT} to {IBAN_CODE} (beneficiary {PERSON}) completed. Reference {REF}.",
    "Account holder: {PERSON}\nID: {CN_RESIDENT_ID}\nCard: {CREDIT_CARD}\nBranch: {LOCATION}",
    "Login to online banking from {IP_ADDRESS} at {TIME}. If this wasn't you, email {EMAIL_ADDRESS}.",
    "Your statement for order {BADCARD} is ready at {URL}. Customer service: {PHONE_NUMBER}.",
    # social posts
    "Just landed in {LOCATION}! Thanks {HANDLE} for the tips. Pics at {URL}",
    "{PERSON} here, DM me at {HANDLE} or mail {EMAIL_ADDRESS}. Based in {LOCATION}.",
    "Shoutout to {HANDLE} and {HANDLE} for the meetup in {LOCATION} last night",
    "Selling my bike, text {PHONE_NUMBER}. Pickup in {LOCATION} only.",
    "New blog post: {URL} by {PERSON} ({HANDLE})",
]

HELDOUT = [
    "Ticket #{REF}: customer {PERSON} cannot log in. Last seen from {IP_ADDRESS}. Callback number {PHONE_NUMBER}.",
    "Employee record. Name: {PERSON}; national ID {CN_RESIDENT_ID}; salary account {IBAN_CODE}; office {LOCATION}.",
    "Insurance claim {REF} filed by {PERSON} on {DATE}. Policyholder SSN {US_SSN}. Reimburse to card {CREDIT_CARD}.",
    "chat log {TIME} <{HANDLE}> hey can u send the file to {EMAIL_ADDRESS}? thx",
    "Prescription for {PERSON}, {AGE} y/o, pick up at the pharmacy in {LOCATION}. Pharmacist: {PERSON}, "
    "{PHONE_NUMBER}.",
    "Hi {PERSON}, your parcel to {LOCATION} is delayed. Track it at {URL} or reply to {EMAIL_ADDRESS}.",
    "Fraud alert: card {CREDIT_CARD} used at {IP_ADDRESS} in {LOCATION} for {AMOUNT}.",
    "Meeting notes: {PERSON} and {PERSON} agreed to move the launch to {DATE}. Slides: {URL}",
    "RSVP to {PERSON} at {PHONE_NUMBER} before {DATE}.",
    "Wire details: beneficiary {PERSON}, IBAN {IBAN_CODE}, amount {AMOUNT}, ref {REF}.",
    "Our new nurse {PERSON} moved here from {LOCATION}; follow her at {HANDLE}.",
    "Verification failed for ID number {CN_RESIDENT_ID}; please call {PHONE_NUMBER} or visit {URL}.",
    "Tax form received from {PERSON} (SSN {US_SSN}), {LOCATION}.",
    "Server {IP_ADDRESS} logged a request from user {HANDLE} with email {EMAIL_ADDRESS}.",
    "Visitor {PERSON} from {LOCATION} signed in at {TIME}; badge {REF}.",
    "Kindly pay {AMOUNT} to account {IBAN_CODE} by {DATE}. Invoice {BADCARD}.",
    "Thanks for the referral, {PERSON}! Your friend {PERSON} can reach you on {PHONE_NUMBER}?",
    "She grew up in {LOCATION} and studied in {LOCATION} before joining us.",
    "Card on file {CREDIT_CARD}, exp 09/27. Cardholder {PERSON}, billing city {LOCATION}.",
    "Appointment confirmed for {PERSON} on {DATE} at {TIME}. Questions? {PHONE_NUMBER} or {EMAIL_ADDRESS}",
]


class Values:
    """Seeded generators of planted values (varied formats and locales) and of distractors."""

    def __init__(self, seed: int) -> None:
        from faker import Faker

        self.rng = random.Random(seed)
        self.fake = {loc: Faker(loc) for loc in ("en_US", "en_GB", "en_CA", "fr_FR", "de_DE", "it_IT", "es_ES",
                                                 "nl_NL", "zh_CN")}
        for i, f in enumerate(self.fake.values()):
            f.seed_instance(seed * 100 + i)

    def pick(self, *locales: str):
        return self.fake[self.rng.choice(locales)]

    def PERSON(self) -> tuple[str, str, str]:
        """``(title, name, degree)``: Faker's titles and degrees ("Dipl.-Ing.", "MBA.") are written but not planted."""
        r = self.rng.random()
        if r < 0.3:
            return "", self.fake["zh_CN"].romanized_name(), ""
        f = self.pick("en_US", "en_GB", "en_CA", "de_DE", "fr_FR", "es_ES")
        if r >= 0.8:
            return "", f"{f.first_name()} {f.last_name()}", ""
        m = re.fullmatch(r"((?:(?:Mrs?|Ms|Miss|Dr|Mx|\S+\.)\s*)*)(.*?)((?:\s+(?:\S+\.|MD|DDS|DVM|PhD|I|II|III|IV|V))*)",
                         f.name())
        return m.group(1), m.group(2), m.group(3)

    def LOCATION(self) -> str:
        r = self.rng.random()
        if r < 0.4:
            return self.pick("en_US", "en_GB", "de_DE", "fr_FR", "it_IT", "es_ES", "nl_NL").city()
        return self.fake["en_US"].country() if r < 0.7 else self.fake["en_US"].state()

    def EMAIL_ADDRESS(self) -> str:
        f = self.pick("en_US", "en_GB", "de_DE", "fr_FR")
        return self.rng.choice([f.email, f.free_email, f.company_email])()

    def PHONE_NUMBER(self) -> str:
        r = self.rng.random()
        if r < 0.2:
            return self.fake["zh_CN"].phone_number()
        if r < 0.3:
            d = self.fake["zh_CN"].phone_number()
            return self.rng.choice([f"+86 {d[:3]} {d[3:7]} {d[7:]}", f"{d[:3]}-{d[3:7]}-{d[7:]}", f"+86-{d}"])
        return self.pick("en_US", "en_CA", "en_GB", "fr_FR").phone_number()

    def CREDIT_CARD(self) -> str:
        kind = self.rng.choice(["visa16", "visa16", "mastercard", "amex", "discover", "jcb16", "diners", "visa19",
                                "unionpay16", "unionpay19"])
        if kind.startswith("unionpay"):
            digits = _luhn_complete("62" + "".join(self.rng.choice("0123456789") for _ in range(int(kind[-2:]) - 3)))
        else:
            digits = self.fake["en_US"].credit_card_number(kind)
        return _group(digits, self.rng.choice(["", " ", "-"]), self.rng)

    def IBAN_CODE(self) -> str:
        iban = self.pick("en_GB", "de_DE", "fr_FR", "es_ES", "nl_NL", "it_IT").iban()
        return iban if self.rng.random() < 0.5 else " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))

    def US_SSN(self) -> str:
        return self.fake["en_US"].ssn()

    def CN_RESIDENT_ID(self) -> str:
        return self.fake["zh_CN"].ssn()

    def URL(self) -> str:
        f = self.fake["en_US"]
        return self.rng.choice([f.url, f.uri, lambda: "www." + f.domain_name(),
                                lambda: f"{f.domain_name()}/{f.uri_path()}"])()

    def HANDLE(self) -> str:
        return "@" + self.pick("en_US", "en_GB", "fr_FR").user_name()

    def IP_ADDRESS(self) -> str:
        f = self.fake["en_US"]
        return self.rng.choice([f.ipv4_public, f.ipv4_private, f.ipv6])()

    # distractors: never PII, any prediction on them is a false positive
    def AGE(self) -> str:
        return self.rng.choice([f"{self.rng.randint(18, 95)}", f"{self.rng.randint(18, 95)}yo"])

    def DATE(self) -> str:
        d = self.fake["en_US"].date_object()
        return self.rng.choice([d.isoformat(), d.strftime("%d/%m/%Y"), d.strftime("%B %d, %Y"), d.strftime("%d.%m.%Y")])

    def TIME(self) -> str:
        return self.fake["en_US"].time(self.rng.choice(["%H:%M", "%H:%M:%S", "%I:%M %p"]))

    def AMOUNT(self) -> str:
        return self.rng.choice(["$", "EUR ", "¥", "£"]) + f"{self.rng.uniform(1, 99999):,.2f}"

    def REF(self) -> str:
        return "".join(self.rng.choice("0123456789") for _ in range(self.rng.randint(6, 12)))

    def BADCARD(self) -> str:  # card-shaped, Luhn-invalid
        digits = self.fake["en_US"].credit_card_number("visa16")
        digits = digits[:-1] + str((int(digits[-1]) + 1) % 10)
        return _group(digits, self.rng.choice(["", " ", "-"]), self.rng)


def _luhn_complete(partial: str) -> str:
    for d in "0123456789":
        total = sum((int(c) * 2 - 9 if int(c) * 2 > 9 else int(c) * 2) if i % 2 else int(c)
                    for i, c in enumerate(reversed(partial + d)))
        if total % 10 == 0:
            return partial + d
    raise AssertionError


def _group(digits: str, sep: str, rng: random.Random) -> str:
    if not sep:
        return digits
    sizes = [4, 6, 5] if len(digits) == 15 else [4, 6, 4] if len(digits) == 14 else [4] * 4 + [3]
    parts, i = [], 0
    for s in sizes:
        if i < len(digits):
            parts.append(digits[i:i + s])
            i += s
    return sep.join(parts)


TRUTH_TYPES = ("PERSON", "LOCATION", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN",
               "CN_RESIDENT_ID", "URL", "HANDLE", "IP_ADDRESS")


def make_records(templates: list[str], n: int, values: Values) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """``n`` records ``(text, [(type, start, end), …])`` cycling through ``templates`` in a shuffled order."""
    records = []
    for i in range(n):
        template = templates[i % len(templates)]
        text, spans, pos = "", [], 0
        for m in re.finditer(r"\{(\w+)\}", template):
            text += template[pos:m.start()]
            value = getattr(values, m.group(1))()
            before, value, after = value if isinstance(value, tuple) else ("", value, "")
            text += before
            if m.group(1) in TRUTH_TYPES:
                spans.append((m.group(1), len(text), len(text) + len(value)))
            text += value + after
            pos = m.end()
        records.append((text + template[pos:], spans))
    values.rng.shuffle(records)
    return records


def _match(a: tuple[int, int], b: tuple[int, int]) -> bool:
    inter = min(a[1], b[1]) - max(a[0], b[0])
    return inter > 0 and inter >= 0.5 * max(a[1] - a[0], b[1] - b[0])


def score(records, predictions) -> dict[str, dict[str, float]]:
    found, truths, correct, predicted = Counter(), Counter(), Counter(), Counter()
    for (_, spans), preds in zip(records, predictions, strict=True):
        for kind, s, e in spans:
            truths[kind] += 1
            found[kind] += any(p[0] == kind and _match((s, e), p[1:]) for p in preds)
        for kind, s, e in preds:
            predicted[kind] += 1
            correct[kind] += any(t[0] == kind and _match((s, e), t[1:]) for t in spans)
    out = {}
    for kind in sorted(set(truths) | set(predicted)):
        recall = found[kind] / truths[kind] if truths[kind] else None
        precision = correct[kind] / predicted[kind] if predicted[kind] else None
        out[kind] = {"planted": truths[kind], "found": found[kind], "predicted": predicted[kind],
                     "correct": correct[kind], "recall": recall, "precision": precision,
                     "met": recall is not None and recall >= TARGET_RECALL
                     and (precision or 0.0) >= TARGET_PRECISION}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=400, help="records per template set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-misses", action="store_true", help="print missed and spurious spans")
    parser.add_argument("--only", choices=["dev", "heldout"], help="run one template set (no JSON written)")
    args = parser.parse_args()

    from privlora.data.sanitize.pii.engine import ENTITIES, PiiScrubber, build_analyzer

    start = time.perf_counter()
    scrubber = PiiScrubber(operator="replace")
    build_analyzer()
    load_s = time.perf_counter() - start
    values = Values(args.seed)
    result = {"benchmark": "pii_quality", "records_per_set": args.records, "seed": args.seed,
              "entities": list(ENTITIES), "threshold": scrubber.threshold, "load_s": load_s,
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()}, "sets": {}}
    for name, templates in (("dev", DEV), ("heldout", HELDOUT)):
        if args.only and name != args.only:
            continue
        records = make_records(templates, args.records, values)
        scrubber.scrub_many([text for text, _ in records[:20]])  # warm-up: regex compilation, first batches
        start = time.perf_counter()
        outputs = scrubber.scrub_many([text for text, _ in records])
        elapsed = time.perf_counter() - start
        predictions = [[(f.label, f.where["start"], f.where["end"]) for f in found] for _, found in outputs]
        per_type = score(records, predictions)
        result["sets"][name] = {"templates": len(templates), "records": len(records), "seconds": elapsed,
                                "records_per_s": len(records) / elapsed, "per_type": per_type}
        print(f"\n{name}: {len(records)} records from {len(templates)} templates, "
              f"{len(records) / elapsed:.1f} records/s")
        print(f"{'type':16s} {'planted':>7s} {'recall':>7s} {'predicted':>9s} {'precision':>9s}  target")
        for kind, row in per_type.items():
            rec = "-" if row["recall"] is None else f"{row['recall']:.3f}"
            prec = "-" if row["precision"] is None else f"{row['precision']:.3f}"
            print(f"{kind:16s} {row['planted']:7d} {rec:>7s} {row['predicted']:9d} {prec:>9s}  "
                  f"{'met' if row['met'] else 'MISSED'}")
        if args.show_misses:
            _show(records, predictions)
    if args.only:
        return
    heldout = result["sets"]["heldout"]["per_type"]
    result["target"] = {"min_recall": TARGET_RECALL, "min_precision": TARGET_PRECISION, "judged_on": "heldout",
                        "met": {kind: heldout[kind]["met"] for kind in TRUTH_TYPES if kind in heldout},
                        "all_met": all(heldout[kind]["met"] for kind in TRUTH_TYPES if kind in heldout)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


def _show(records, predictions) -> None:
    for (text, spans), preds in zip(records, predictions, strict=True):
        for kind, s, e in spans:
            if not any(p[0] == kind and _match((s, e), p[1:]) for p in preds):
                print(f"  MISS {kind:14s} {text[s:e]!r}  in {text!r}")
        for kind, s, e in preds:
            if not any(t[0] == kind and _match((s, e), t[1:]) for t in spans):
                print(f"  FP   {kind:14s} {text[s:e]!r}  in {text!r}")


if __name__ == "__main__":
    main()
