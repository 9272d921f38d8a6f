"""PII in text datasets: recognizers, overlap resolution, operators, tables — all offline.

One analyzer for the whole module (building it loads spaCy: seconds). Every test in this module runs with
outbound connections refused, so anything that would reach the network (Presidio's tldextract-based
recognizers, a spaCy model download) fails loudly instead of hanging or passing by luck.
"""

from __future__ import annotations

import csv
import io
import json
import socket
from datetime import date
from pathlib import Path

import pytest

from privlora.data.sanitize.report import SkipFile
from privlora.errors import UserError

ID = "11010519491231002X"  # the GB 11643 example: Beijing Chaoyang, born 1949-12-31
CARD_VISA, CARD_UNIONPAY = "4111 1111 1111 1111", "6222 0212 3456 7890 128"


@pytest.fixture(scope="module", autouse=True)
def no_network():
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        # tldextract (Presidio's e-mail/URL validation) may answer from a disk cache without a socket
        tldextract = pytest.importorskip("tldextract")
        mp.setattr(tldextract.TLDExtract, "__call__", refuse)
        mp.setattr(tldextract.TLDExtract, "extract_str", refuse)
        yield


@pytest.fixture(scope="module")
def pii(no_network):
    from privlora.data.sanitize import pii

    return pii


@pytest.fixture(scope="module")
def scrubber(pii):
    s = pii.PiiScrubber()
    s.scrub("warm up")  # builds the analyzer once, inside the no-network guard
    return s


def labels(scrubber, text: str, **kw) -> list[tuple[str, str]]:
    """``[(label, matched text), …]`` for ``text``."""
    _, found = scrubber.scrub(text, **kw)
    return [(f.label, text[f.where["start"]:f.where["end"]]) for f in found]


# --- checksums ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "ok"), [
    (ID, True), (ID.lower(), True), ("440306198506121233", True),
    ("110105194912310021", False),  # wrong check character
    ("110105194902300020", False),  # 30 February, checksum right
    ("110105209912310029", False),  # born in 2099
    ("990105194912310023", False),  # no province 99
    ("1101051949123100", False),
])
def test_cn_resident_id_checksum(pii, value, ok):
    from privlora.data.sanitize.pii.recognizers import cn_resident_id_valid

    assert cn_resident_id_valid(value, today=date(2030, 1, 1)) is ok


@pytest.mark.parametrize(("digits", "ok"), [("4111111111111111", True), ("6222021234567890128", True),
                                            ("378282246310005", True), ("4111111111111112", False)])
def test_luhn(pii, digits, ok):
    from privlora.data.sanitize.pii.recognizers import luhn_valid

    assert luhn_valid(digits) is ok


# --- recognizers through the analyzer: positives and near misses -----------------------------------------

POSITIVES = [
    (f"ID {ID}.", ("CN_RESIDENT_ID", ID)),
    ("身份证号440306198506121233，请核对", ("CN_RESIDENT_ID", "440306198506121233")),
    (f"Card {CARD_VISA} expires 09/27", ("CREDIT_CARD", CARD_VISA)),
    (f"银行卡{CARD_UNIONPAY.replace(' ', '')}。", ("CREDIT_CARD", CARD_UNIONPAY.replace(" ", ""))),
    ("Amex 3782-822463-10005 on file", ("CREDIT_CARD", "3782-822463-10005")),
    ("phone +86 138 0013 8000 today", ("PHONE_NUMBER", "+86 138 0013 8000")),
    ("电话13800138000", ("PHONE_NUMBER", "13800138000")),
    ("ring (415) 555-0132 x12 now", ("PHONE_NUMBER", "(415) 555-0132 x12")),
    ("office +44 20 7946 0958", ("PHONE_NUMBER", "+44 20 7946 0958")),
    ("Tel: 4155550132", ("PHONE_NUMBER", "4155550132")),
    ("Please call 4155550132 tonight", ("PHONE_NUMBER", "4155550132")),
    ("mail zhang.wei@example.com.", ("EMAIL_ADDRESS", "zhang.wei@example.com")),
    ("see https://example.org/a?b=1, thanks", ("URL", "https://example.org/a?b=1")),
    ("visit www.example.co.uk/help.", ("URL", "www.example.co.uk/help")),
    ("follow @zhang_wei88 for news", ("HANDLE", "@zhang_wei88")),
    ("from 203.0.113.7 at night", ("IP_ADDRESS", "203.0.113.7")),
    ("IBAN GB82 WEST 1234 5698 7654 32 ok", ("IBAN_CODE", "GB82 WEST 1234 5698 7654 32")),
    ("SSN 536-22-1948 on file", ("US_SSN", "536-22-1948")),
    ("Dear Qiang Kong, welcome", ("PERSON", "Qiang Kong")),
    ("Referred by Dr. Evans to us", ("PERSON", "Evans")),
    ("She moved to Germany last year", ("LOCATION", "Germany")),
]


@pytest.mark.parametrize(("text", "expected"), POSITIVES, ids=[p[1][0] + ":" + p[1][1] for p in POSITIVES])
def test_recognizes(scrubber, text, expected):
    assert expected in labels(scrubber, text)


NEAR_MISSES = [
    "ID 110105194912310021 was rejected",  # wrong check character
    "ID 110105194902300020 was rejected",  # impossible date
    "order 4111 1111 1111 1112 shipped",  # fails Luhn
    "order 9111111111111110 shipped",  # passes Luhn, no card network starts with 9
    "seen on 2024-01-15 at 10:30, paid $1,234.56, version 1.2.3",
    "reference 4155550132 noted",  # bare digits without a phone word
    "meet @ 10:30 or @10",
    "3 tablets of 500 mg twice daily for 10 days",
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_not_flagged(scrubber, text):
    assert labels(scrubber, text) == []


def test_email_is_one_finding_not_also_handle_or_url(scrubber):
    assert labels(scrubber, "write to zhang.wei@example.com or a@b.org") == [
        ("EMAIL_ADDRESS", "zhang.wei@example.com"), ("EMAIL_ADDRESS", "a@b.org")]


def test_numbers_are_not_also_phones(scrubber):
    text = f"card {CARD_UNIONPAY}, ID {ID}, IBAN DE89 3704 0044 0532 0130 00"
    assert [label for label, _ in labels(scrubber, text)] == ["CREDIT_CARD", "CN_RESIDENT_ID", "IBAN_CODE"]


def test_column_name_is_context(scrubber):
    assert labels(scrubber, "4155550132", context=["phone"]) == [("PHONE_NUMBER", "4155550132")]
    assert labels(scrubber, "4155550132", context=["amount"]) == []


def test_handle_recognizer_alone_skips_emails(pii):
    from privlora.data.sanitize.pii.recognizers import RECOGNIZERS

    handles = RECOGNIZERS["handle"]()
    found = handles.analyze("mail zhang.wei@example.com or ping @zhang_wei, @a.b@mastodon.social", ["HANDLE"])
    text = "mail zhang.wei@example.com or ping @zhang_wei, @a.b@mastodon.social"
    assert [text[r.start:r.end] for r in found] == ["@zhang_wei", "@a.b@mastodon.social"]
    urls = RECOGNIZERS["url"]().analyze("zhang.wei@example.com", ["URL"])
    assert urls == []


# --- overlap resolution ---------------------------------------------------------------------------------


def _result(entity, start, end, score):
    from presidio_analyzer import RecognizerResult

    return RecognizerResult(entity, start, end, score, recognition_metadata={"recognizer_name": "t"})


def test_resolve(pii):
    from privlora.data.sanitize.pii.engine import resolve

    def spans(results, text):
        return [(r.entity_type, text[r.start:r.end]) for r in resolve(results, text)]

    text = "George Washington paid"
    assert spans([_result("LOCATION", 7, 17, 0.9), _result("PERSON", 0, 17, 0.85)], text) == [
        ("PERSON", "George Washington")]
    text = "Cardholder Gang Kong"
    assert spans([_result("PERSON", 11, 20, 0.9), _result("PERSON", 0, 20, 0.85)], text) == [("PERSON", "Gang Kong")]
    text = "Xia Dong, 0485405133"
    assert spans([_result("PHONE_NUMBER", 10, 20, 0.5), _result("PERSON", 0, 20, 0.85)], text) == [
        ("PERSON", "Xia Dong"), ("PHONE_NUMBER", "0485405133")]
    text = "Patient Zhang Wei 13800138000"
    assert spans([_result("PHONE_NUMBER", 18, 29, 0.5), _result("PERSON", 8, 17, 0.9),
                  _result("PERSON", 0, 29, 0.85)], text) == [("PERSON", "Zhang Wei"), ("PHONE_NUMBER", "13800138000")]
    text = "Zhang Wei Ming"  # same type, partly overlapping: merged, nothing left out
    assert spans([_result("PERSON", 0, 9, 0.9), _result("PERSON", 6, 14, 0.85)], text) == [("PERSON", text)]


# --- operators ------------------------------------------------------------------------------------------


def test_operators(pii):
    from privlora.data.sanitize.pii.operators import make_operator

    assert make_operator("replace")("Zhang Wei", "PERSON") == "<PERSON>"
    assert make_operator("mask")("+86 138-0013", "PHONE_NUMBER") == "+** ***-****"
    assert make_operator("mask")("张伟", "PERSON") == "**"
    pseudo = make_operator("hash", salt="s3cret")
    assert pseudo("6222 0212 3456", "CREDIT_CARD") == pseudo("6222-0212-3456", "CREDIT_CARD")
    assert pseudo("Zhang  Wei", "PERSON") == pseudo("zhang wei", "PERSON") != pseudo("zhang wei", "LOCATION")
    assert "s3cret" not in repr(pseudo)
    with pytest.raises(UserError, match="hash, mask, replace"):
        make_operator("redact")
    with pytest.raises(UserError, match="salt"):
        make_operator("hash", salt="")


def test_hash_is_consistent_per_salt_and_never_shows_it(scrubber, pii):
    text = "Patient Zhang Wei, phone 13800138000"
    a, b = pii.PiiScrubber(operator="hash", salt="pepper-1"), pii.PiiScrubber(operator="hash", salt="pepper-1")
    c = pii.PiiScrubber(operator="hash", salt="pepper-2")
    out_a, found = a.scrub(text)
    assert out_a == b.scrub(text)[0] != c.scrub(text)[0]
    assert out_a.startswith("Patient <PERSON_") and "13800138000" not in out_a
    report = json.dumps([f.to_json() for f in found])
    assert "pepper" not in out_a + report + repr(a)
    assert "Zhang" not in report and "13800138000" not in report


def test_unknown_names_are_user_errors(pii):
    with pytest.raises(UserError, match="PERSONS"):
        pii.PiiScrubber(entities=["PERSONS"])
    with pytest.raises(UserError, match="choose one of"):
        pii.PiiScrubber(operator="blur")
    assert set(pii.ENTITIES) <= set(pii.supported_entities())
    assert {"CN_RESIDENT_ID", "HANDLE", "DATE_TIME"} <= set(pii.supported_entities())


def test_no_network_recognizers_in_registry(scrubber):
    from privlora.data.sanitize.pii.engine import NETWORK_RECOGNIZERS, build_analyzer

    names = {r.name for r in build_analyzer().registry.recognizers}
    assert not names & set(NETWORK_RECOGNIZERS)
    assert {"privlora:email", "privlora:url", "privlora:cn_resident_id", "privlora:luhn_card"} <= names


def test_emails_and_urls_analysed_offline(scrubber):
    # the module's no_network guard would turn any socket use into a failure here
    assert [label for label, _ in labels(scrubber, "a@b.co.uk https://x.example.io/p www.example.com")] == [
        "EMAIL_ADDRESS", "URL", "URL"]


# --- scrub: offsets, batching, the seed's use cases --------------------------------------------------------


MEDICAL = (f"Patient Zhang Wei, ID {ID}, phone +86 138 0013 8000, card {CARD_UNIONPAY}. Admitted 2024-03-05 "
           "with chest pain; BP 130/85. Contact his daughter at zhang.li@example.com or @zhangli88. Lives in Beijing.")
FINANCE = ("Dear Mr. John Smith, your Visa 4111-1111-1111-1111 was charged $1,250.00 on 05/03/2024. Refunds go to "
           "IBAN DE89 3704 0044 0532 0130 00. SSN on file 536-22-1948. Questions: (415) 555-0132 or "
           "https://bank.example.com/help. Last login from 203.0.113.7.")
SECRETS = {MEDICAL: ["Zhang Wei", ID, "138 0013 8000", CARD_UNIONPAY, "zhang.li@example.com", "@zhangli88", "Beijing"],
           FINANCE: ["John Smith", "4111-1111-1111-1111", "DE89 3704", "536-22-1948", "555-0132",
                     "bank.example.com", "203.0.113.7"]}


@pytest.mark.parametrize("note", [MEDICAL, FINANCE], ids=["medical", "finance"])
def test_seed_notes_fully_scrubbed(scrubber, note):
    out, found = scrubber.scrub(note)
    for secret in SECRETS[note]:
        assert secret not in out, (secret, out)
    for kept in ("chest pain", "130/85", "$1,250.00", "Patient", "Refunds go to"):
        assert kept in out or kept not in note
    assert len(found) == len(SECRETS[note])
    for f in found:  # offsets point into the original text; the finding holds no value
        assert note[f.where["start"]:f.where["end"]].strip() == note[f.where["start"]:f.where["end"]]
        assert f.kind == "pii" and f.action == "replace" and f.text is None


def test_scrub_many_matches_scrub(scrubber):
    texts = [MEDICAL, "", "nothing here", MEDICAL, FINANCE]
    assert scrubber.scrub_many(texts) == [scrubber.scrub(t) for t in texts]


def test_long_text_is_chunked(scrubber, monkeypatch):
    from privlora.data.sanitize.pii import engine

    monkeypatch.setattr(engine, "_CHUNK", 60)
    text = "filler words here. " * 10 + f"ID {ID} end"
    out, found = scrubber.scrub(text)
    assert [text[f.where["start"]:f.where["end"]] for f in found] == [ID]
    assert out.endswith("ID <CN_RESIDENT_ID> end")


# --- tables -------------------------------------------------------------------------------------------


def _stat(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_csv_round_trip(scrubber, pii, tmp_path):
    src = tmp_path / "in" / "notes.csv"
    src.parent.mkdir()
    src.write_bytes(b"id,note,amount\r\n"
                     b'1,"Patient Zhang Wei, phone 13800138000",12.50\r\n'
                     b'2,no pii here,7\r\n'
                     b'3,"Mail a@b.com\nsecond, line",0.10\r\n')
    before = _stat(src)
    report = pii.sanitize_table(src, tmp_path / "out" / "notes.csv", scrubber=scrubber, rel="notes.csv")
    assert _stat(src) == before
    raw = (tmp_path / "out" / "notes.csv").read_bytes().decode()
    rows = list(csv.reader(io.StringIO(raw, newline="")))
    assert rows[0] == ["id", "note", "amount"]
    assert [r[0] for r in rows] == ["id", "1", "2", "3"] and [r[2] for r in rows[1:]] == ["12.50", "7", "0.10"]
    assert rows[1][1] == "Patient <PERSON>, phone <PHONE_NUMBER>"
    assert rows[3][1] == "Mail <EMAIL_ADDRESS>\nsecond, line"
    assert "2,no pii here,7\r\n" in raw and raw.count("\r\n") == 4
    assert report.status == "cleaned" and report.kind == "text" and report.path == "notes.csv"
    assert [(f.label, f.where["row"], f.where["column"]) for f in report.findings] == [
        ("PERSON", 0, "note"), ("PHONE_NUMBER", 0, "note"), ("EMAIL_ADDRESS", 2, "note")]
    with pytest.raises(UserError, match="no column 'text'"):
        pii.sanitize_table(src, None, scrubber=scrubber, rel="notes.csv", columns=["text"])


def test_csv_dialect_kept(scrubber, pii, tmp_path):
    src = tmp_path / "eu.csv"
    src.write_text('"id";"note"\n"1";"Mail a@b.com"\n"2";"none"\n')
    pii.sanitize_table(src, tmp_path / "o.csv", scrubber=scrubber, rel="eu.csv", columns=["note"])
    assert (tmp_path / "o.csv").read_text() == '"id";"note"\n"1";"Mail <EMAIL_ADDRESS>"\n"2";"none"\n'
    src = tmp_path / "t.tsv"
    src.write_text("id\tnote\n1\tcall 13800138000, ok\n")
    pii.sanitize_table(src, tmp_path / "o.tsv", scrubber=scrubber, rel="t.tsv")
    assert (tmp_path / "o.tsv").read_text() == "id\tnote\n1\tcall <PHONE_NUMBER>, ok\n"


def test_jsonl_round_trip_keeps_other_keys(scrubber, pii, tmp_path):
    lines = ['{"file_name": "zhang.wei@example.com.png", "text": "Zhang Wei at 13800138000", "n": 1.10, '
             '"tags": ["Zhang Wei"]}',
             "",
             '{"text":"plain caption","file_name":"b.png"}',
             '{"file_name": "c.png", "text": "\\u5f20\\u4f1f 13800138000"}']
    src = tmp_path / "metadata.jsonl"
    src.write_text("\n".join(lines) + "\n")
    before = _stat(src)
    dst = tmp_path / "out" / "metadata.jsonl"
    report = pii.sanitize_table(src, dst, scrubber=scrubber, rel="metadata.jsonl", columns=["text"])
    assert _stat(src) == before
    out = dst.read_text().split("\n")
    assert out[0] == ('{"file_name": "zhang.wei@example.com.png", "text": "<PERSON> at <PHONE_NUMBER>", "n": 1.10, '
                      '"tags": ["Zhang Wei"]}')
    assert out[1:3] == lines[1:3] and out[4] == ""
    assert out[3] == '{"file_name": "c.png", "text": "\\u5f20\\u4f1f <PHONE_NUMBER>"}'  # escaped stays escaped
    assert [list(json.loads(line)) for line in out if line] == [list(json.loads(line)) for line in lines if line]
    assert {f.where["column"] for f in report.findings} == {"text"}
    assert {f.where["row"] for f in report.findings} == {0, 3}
    every = pii.sanitize_table(src, None, scrubber=scrubber, rel="metadata.jsonl")  # all top-level strings
    assert {f.where["column"] for f in every.findings} == {"text", "file_name"}


def test_txt_keeps_line_endings(scrubber, pii, tmp_path):
    src = tmp_path / "notes.txt"
    src.write_bytes(b"call 13800138000\r\nnothing\nPatient Zhang Wei")
    dst = tmp_path / "out.txt"
    report = pii.sanitize_table(src, dst, scrubber=scrubber, rel="notes.txt")
    assert dst.read_bytes() == b"call <PHONE_NUMBER>\r\nnothing\nPatient <PERSON>"
    assert [(f.where["row"], f.where["start"]) for f in report.findings] == [(0, 5), (2, 8)]


def test_dry_run_writes_nothing(scrubber, pii, tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "Zhang Wei 13800138000"}\n')
    listing = sorted(tmp_path.rglob("*"))
    report = pii.sanitize_table(src, None, scrubber=scrubber, rel="a.jsonl")
    assert report.status == "cleaned" and len(report.findings) == 2
    assert sorted(tmp_path.rglob("*")) == listing and src.read_text() == '{"text": "Zhang Wei 13800138000"}\n'


def test_clean_file_is_copied_byte_for_byte(scrubber, pii, tmp_path):
    src = tmp_path / "a.csv"
    src.write_bytes(b'\xef\xbb\xbf"id";"note"\n"1";"nothing to see"')
    report = pii.sanitize_table(src, tmp_path / "o" / "a.csv", scrubber=scrubber, rel="a.csv")
    assert report.status == "clean" and (tmp_path / "o" / "a.csv").read_bytes() == src.read_bytes()


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": broken}\n', "line 2"),
    ("bad.txt", b"caf\xe9 au lait", "UTF-8"),
    ("ragged.csv", b"a,b\n1,2\n3,4,5\n", "line 3"),
])
def test_unreadable_files_are_skipped(scrubber, pii, tmp_path, name, data, reason):
    src = tmp_path / name
    src.write_bytes(data)
    with pytest.raises(SkipFile, match=reason):
        pii.sanitize_table(src, tmp_path / "out" / name, scrubber=scrubber, rel=name)
    assert not (tmp_path / "out").exists() and src.read_bytes() == data


def test_output_never_overwrites_input(scrubber, pii, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("Zhang Wei")
    with pytest.raises(UserError, match="overwrite"):
        pii.sanitize_table(src, src, scrubber=scrubber, rel="a.txt")
    assert pii.TABLE_SUFFIXES == {".csv", ".tsv", ".jsonl", ".txt"}
