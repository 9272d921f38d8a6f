"""Our own PII recognizers: what Presidio misses, or would go to the network for.

Each recognizer is a small :class:`presidio_analyzer.PatternRecognizer` registered under a key in
:data:`RECOGNIZERS`; the engine (``engine.py``) instantiates every registered class and adds it to
Presidio's registry, and removes the Presidio built-ins a class lists in ``REPLACES`` — the analyzer
never names a recognizer. Adding one is adding one class here with ``@register("key")``.

Checksums and plausibility checks live in ``validate_result``, Presidio's hook: ``True`` raises a match
to score 1.0, ``False`` drops it, ``None`` keeps the pattern's own score (used where a check can only
refute). Class names start with ``Privlora``: Presidio's YAML loader picks predefined recognizers by class
name among *all* subclasses, so an ``EmailRecognizer`` of ours would silently stand in for its own.
Nothing here loads a model or touches the network; patterns use ASCII look-arounds instead of
``\\b`` so that an ID glued to Chinese text (``身份证号11010519491231002X``) is still found.
"""

from __future__ import annotations

import re
from datetime import date
from typing import ClassVar

from presidio_analyzer import Pattern, PatternRecognizer, RecognizerResult

RECOGNIZERS: dict[str, type[PrivloraRecognizer]] = {}

_CASE = re.DOTALL | re.MULTILINE  # case-sensitive: Presidio's default adds IGNORECASE
_NOCASE = _CASE | re.IGNORECASE
_L, _R = r"(?<![0-9A-Za-z])", r"(?![0-9A-Za-z])"  # ASCII word edges; CJK text around a match is fine
_EXT = r"(?:\s?(?:x|ext\.?)\s?\d{1,6})?"  # phone extension: 555-123-4567x890


def register(key: str):
    """Class decorator: add a recognizer to :data:`RECOGNIZERS` under ``key`` (its detector is ``privlora:key``)."""

    def add(cls: type[PrivloraRecognizer]) -> type[PrivloraRecognizer]:
        if key in RECOGNIZERS:
            raise ValueError(f"PII recognizer {key!r} is registered twice")
        cls.KEY = key
        RECOGNIZERS[key] = cls
        return cls

    return add


class PrivloraRecognizer(PatternRecognizer):
    """A Presidio pattern recognizer described by class attributes; cheap to build (no model, no I/O)."""

    KEY: ClassVar[str]
    ENTITY: ClassVar[str]
    PATTERNS: ClassVar[tuple[tuple[str, str, float], ...]]  # (name, regex, score)
    CONTEXT: ClassVar[tuple[str, ...]] = ()
    FLAGS: ClassVar[int] = _CASE
    REPLACES: ClassVar[tuple[str, ...]] = ()  # Presidio built-ins this recognizer supersedes

    WINDOW: ClassVar[int] = 40  # characters before a match searched for CONTEXT words
    BOOST, MIN_WITH_CONTEXT = 0.35, 0.4  # Presidio's own context factors

    def __init__(self, supported_language: str = "en") -> None:
        super().__init__(supported_entity=self.ENTITY, name=f"privlora:{self.KEY}",
                         supported_language=supported_language,
                         patterns=[Pattern(name, regex, score) for name, regex, score in self.PATTERNS],
                         context=list(self.CONTEXT) or None, global_regex_flags=self.FLAGS)
        words = sorted(self.CONTEXT, key=len, reverse=True)
        self._context = re.compile("|".join(rf"(?<![A-Za-z]){re.escape(w)}s?(?![A-Za-z])" if w.isascii()
                                            else re.escape(w) for w in words), re.IGNORECASE) if words else None

    def enhance_using_context(self, text, raw_recognizer_results, other_raw_recognizer_results, nlp_artifacts,
                              context=None):
        """Boost a match with a context word in the raw text just before it.

        Presidio's own enhancer only sees lemmas that are not stop words — and spaCy counts "call" as one —
        and cannot see "电话" glued to the number after it; it still runs on results not boosted here.
        """
        for result in raw_recognizer_results if self._context else ():
            if self._context.search(text, max(0, result.start - self.WINDOW), result.start):
                result.score = min(1.0, max(result.score + self.BOOST, self.MIN_WITH_CONTEXT))
                result.recognition_metadata[RecognizerResult.IS_SCORE_ENHANCED_BY_CONTEXT_KEY] = True
        return raw_recognizer_results


# --- checksums (pure functions, unit-tested on their own) ---------------------------------------------

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_ID_PROVINCES = frozenset([11, 12, 13, 14, 15, 21, 22, 23, *range(31, 38), *range(41, 47), *range(50, 55),
                           *range(61, 66), 71, 81, 82, 83])


def cn_resident_id_valid(value: str, *, today: date | None = None) -> bool:
    """GB 11643-1999: province code, a real birth date not in the future, ISO 7064 MOD 11-2 check char."""
    s = re.sub(r"[\s-]", "", value).upper()
    if not re.fullmatch(r"\d{17}[\dX]", s) or int(s[:2]) not in _ID_PROVINCES:
        return False
    try:
        born = date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    if not date(1850, 1, 1) <= born <= (today or date.today()):
        return False
    return _ID_CHECK[sum(int(d) * w for d, w in zip(s[:17], _ID_WEIGHTS, strict=True)) % 11] == s[17]


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return bool(digits) and total % 10 == 0


# --- recognizers ----------------------------------------------------------------------------------------


@register("cn_resident_id")
class PrivloraCnResidentIdRecognizer(PrivloraRecognizer):
    """18-character PRC resident identity card number (居民身份证号), checksum-validated."""

    ENTITY = "CN_RESIDENT_ID"
    _DATE = r"(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
    PATTERNS = ((
        "cn_resident_id", _L + r"[1-9]\d{5}([ -]?)" + _DATE + r"\1\d{3}[\dXx]" + _R, 0.4),)
    CONTEXT = ("id", "identity", "resident", "citizen", "身份证", "身份证号", "证件号")

    def validate_result(self, pattern_text: str) -> bool:
        return cn_resident_id_valid(pattern_text)


@register("luhn_card")
class PrivloraLuhnCardRecognizer(PrivloraRecognizer):
    """Payment cards: 13–19 digits (grouped by spaces or dashes, or not), a card-network first digit, Luhn."""

    ENTITY = "CREDIT_CARD"
    PATTERNS = (("card", _L + r"\d{4}([ -]?)\d{4,6}\1\d{4,5}(?:\1\d{1,4})?(?:\1\d{1,3})?" + _R, 0.3),)
    CONTEXT = ("card", "credit", "debit", "visa", "mastercard", "amex", "unionpay", "银行卡", "卡号")
    REPLACES = ("CreditCardRecognizer",)  # its pattern stops at 17 digits: misses 19-digit UnionPay cards

    def validate_result(self, pattern_text: str) -> bool:
        digits = re.sub(r"\D", "", pattern_text)
        return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


@register("phone")
class PrivloraPhoneRecognizer(PrivloraRecognizer):
    """Phone numbers: international (+CC …), NANP, Chinese mobiles and landlines, bracketed/UK/French national.

    Formatted numbers score at or above the default threshold; bare digit runs score below it and need a
    context word (``phone``, ``tel``, ``电话`` … or a column named so) to be reported.
    """

    ENTITY = "PHONE_NUMBER"
    _NOPLUS = r"(?<![0-9A-Za-z+])(?<!\d[ .-])"  # not the tail of a longer digit group
    PATTERNS = (
        ("international", _NOPLUS + r"\+[1-9]\d{0,2}(?:[ .-]?\(0\))?(?:[ .-]?\(?\d{1,5}\)?){1,6}" + _EXT + _R, 0.7),
        ("nanp", _NOPLUS + r"(?:(?:\+?1|001)[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}" + _EXT + _R, 0.6),
        ("cn_mobile", _NOPLUS + r"(?:(?:\+|00)?86[ -]?)?1[3-9]\d([ -]?)\d{4}\1\d{4}" + _R, 0.5),
        ("cn_landline", _NOPLUS + r"(?:\(0\d{2,3}\)|0\d{2,3}-)\d{7,8}" + _R, 0.5),
        ("national_bracketed", _NOPLUS + r"\(0\d{1,4}\)\s?\d{3,4}[ -]?\d{3,4}" + _R, 0.5),
        ("fr_pairs", _NOPLUS + r"0[1-9](?:[ .]\d{2}){4}" + _R, 0.5),
        ("national_spaced", _NOPLUS + r"0\d{2,4} \d{3,4} ?\d{3,4}" + _R, 0.5),
        ("bare", _NOPLUS + r"(?:\d{10}|0\d{10})" + _R, 0.3),  # NANP, or a UK-style 11-digit national number
    )
    CONTEXT = ("phone", "telephone", "tel", "mobile", "cell", "cellphone", "call", "fax", "contact", "sms",
               "whatsapp", "wechat", "电话", "手机", "联系电话", "手机号")
    REPLACES = ("PhoneRecognizer",)  # python-phonenumbers per region: misses unassigned-but-plausible numbers

    def validate_result(self, pattern_text: str) -> bool | None:
        main = re.split(r"\s?(?:x|ext)", pattern_text, maxsplit=1)[0]
        digits = re.sub(r"\D", "", main)
        if not 7 <= len(digits) <= 15 or len(set(digits)) == 1:
            return False
        return None


@register("email")
class PrivloraEmailRecognizer(PrivloraRecognizer):
    """E-mail addresses, without Presidio's tldextract check (it downloads the public-suffix list)."""

    ENTITY = "EMAIL_ADDRESS"
    PATTERNS = (("email", r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
                 r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])", 0.9),)
    CONTEXT = ("email", "e-mail", "mail", "邮箱")
    FLAGS = _NOCASE
    REPLACES = ("EmailRecognizer",)

    def validate_result(self, pattern_text: str) -> bool | None:
        return False if ".." in pattern_text else None


_TLDS = ("com|org|net|edu|gov|mil|int|info|biz|io|ai|app|dev|co|me|tv|ly|cn|hk|tw|jp|kr|sg|in|uk|de|fr|it|es|nl|"
         "be|ch|at|se|no|dk|fi|pl|ru|eu|us|ca|au|nz|br|mx")
_URL_BODY = r"(?:[/?#][A-Za-z0-9\-._~:/?#@!$&*+,;=%()]*[A-Za-z0-9\-_~/#@$&*+=%])?"


@register("url")
class PrivloraUrlRecognizer(PrivloraRecognizer):
    """Web addresses: with a scheme, ``www.``, or a bare host under a common TLD (no public-suffix download)."""

    ENTITY = "URL"
    _HOST = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
    PATTERNS = (
        ("scheme", _L + r"(?:https?|ftp)://[A-Za-z0-9\-._~:/?#@!$&*+,;=%()\[\]]*[A-Za-z0-9\-_~/#@$&*+=%]", 0.9),
        ("www", r"(?<![0-9A-Za-z./@-])www\." + _HOST + r"[a-z]{2,24}(?::\d{1,5})?" + _URL_BODY + r"(?![\w@-])",
         0.85),
        ("bare_host", r"(?<![0-9A-Za-z./@_-])" + _HOST + rf"(?:{_TLDS})(?::\d{{1,5}})?" + _URL_BODY + r"(?![\w@-])",
         0.6),
    )
    CONTEXT = ("url", "link", "website", "site", "web", "homepage", "网址", "链接")
    FLAGS = _NOCASE
    REPLACES = ("UrlRecognizer",)


@register("handle")
class PrivloraHandleRecognizer(PrivloraRecognizer):
    """Social-media handles: ``@name`` (or fediverse ``@name@host``), never the tail of an e-mail address."""

    ENTITY = "HANDLE"
    PATTERNS = (("handle", r"(?<![0-9A-Za-z_.@+\-/])@(?=[A-Za-z0-9_.]*[A-Za-z_])[A-Za-z0-9_](?:[A-Za-z0-9_.]{0,28}"
                 r"[A-Za-z0-9_])?(?:@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)?(?![A-Za-z0-9_@])", 0.8),)
    CONTEXT = ("twitter", "instagram", "weibo", "tiktok", "follow", "handle", "dm", "mention")


_NAME_WORD = r"\p{Lu}\p{Ll}+(?:[-']\p{Lu}?\p{Ll}+)?"
_PARTICLE = r"(?:de|da|do|dos|das|du|del|della|di|van|von|der|den|la|le|bin|al)"
_TITLE = r"(?:Mr|Mrs|Ms|Mx|Miss|Dr|Prof|Ing|Dipl|Mag|Univ)"
_NOT_NAMES = frozenset(
    "A An The This That These Those It He She They We You I My Our Your His Her Their Is Was Has Had Have Will "
    "Would Can Could May Should Presents Presented Reports Reported Denies Denied Admitted Education Information "
    "Portal Record Records Care History Safety Services Service Support Team Account Number Card Customer Client "
    "Member Members User Users Sir Madam All Colleague Colleagues Valued Friend Friends Doctor Patient Name "
    "Physician Nurse Staff Department Office Hospital Clinic Bank Manager Holder Mr Mrs Ms Mx Miss Dr Prof Ing Dipl "
    "Mag Univ World Everyone Everybody There".split())


@register("titled_name")
class PrivloraTitledNameRecognizer(PrivloraRecognizer):
    """Person names after a cue the NER model often misses: titles, ``Patient``, ``Dear``, ``Name:`` …"""

    ENTITY = "PERSON"
    _CUE = (r"(?:" + _TITLE + r"|Dear|Patient|patient|Hi|Hello|Attn|[Nn]ame\s*[:：]|[Cc]ardholder\s*[:：]?"
            r"|[Aa]ccount [Hh]older\s*[:：]?|[Pp]atient [Nn]ame\s*[:：]?|[Mm]y name is"
            r"|(?:[Kk]ind |[Bb]est )?[Rr]egards,|Sincerely,|Thanks,)")
    PATTERNS = ((
        "titled_name",
        r"(?<=(?<![A-Za-z])" + _CUE + r"\.?\s{1,3}(?:" + _TITLE + r"\.?-?\s?)*)"
        + _NAME_WORD + r"(?:[ ](?:" + _PARTICLE + r"[ ]){0,2}" + _NAME_WORD + r"){0,2}(?!\w)", 0.9),)

    def validate_result(self, pattern_text: str) -> bool | None:
        return False if pattern_text.split()[0] in _NOT_NAMES else None


_SYLLABLE = (r"(?:[zcs]h|[bpmfdtnlgkhjqxrzcsyw])?(?:iang|iong|uang|ueng|ang|eng|ing|ong|ian|iao|uai|uan|ai|ei|ao|ou|an|"
             r"en|in|un|ia|ie|iu|ua|uo|ui|ue|er|a|o|e|i|u|v)")
_SYLLABLE2 = _SYLLABLE.replace(")?(?:", ")(?:", 1)  # after the first syllable an initial is required
_GIVEN = rf"(?=[A-Z])(?i:{_SYLLABLE}(?:{_SYLLABLE2})?)(?:-(?i:{_SYLLABLE}(?:{_SYLLABLE2})?))?"
#: The most common Chinese family names in pinyin (they cover about 85% of the population).
CN_SURNAMES = tuple("""
Wang Li Zhang Liu Chen Yang Huang Zhao Wu Zhou Xu Sun Ma Zhu Hu Guo He Gao Lin Luo Zheng Liang Xie Song Tang
Han Feng Deng Cao Peng Zeng Xiao Tian Dong Yuan Pan Jiang Cai Yu Du Ye Cheng Wei Su Lyu Lv Ding Ren Shen Yao
Lu Cui Zhong Tan Fan Jin Shi Liao Jia Xia Fu Fang Bai Zou Meng Xiong Qin Qiu Hou Yin Xue Yan Duan Lei Long Tao
Gu Mao Hao Gong Shao Wan Qian Dai Mo Kong Xiang Chang Qiao Lai Wen Kang Niu Hong Zhan Ni Ou Lan Qi Xing Hua
Bao Ke Yi Mei Zuo Geng Ji Shu Ning Ge Min Rao Che Ai Zhuang Qu Gan Mu Ouyang Situ Zhuge Shangguan
""".split())
_ENGLISH_PINYIN = frozenset("""
He Can Man Ran Sun Long Die Lie Tie Pie Hen Men Ten Hang Fan Ban Bang Pan Tan Song Me We She Be Do
Go So No To You An A O Bye Ago Ma Hi Ha Ye Bin Pin Tin Sin Den Lee Zen Run Fun Gun Nun Bun Gone Tune
Dune Done None Tone Bone Zone Lone Shin Chin Mine
""".split())


@register("pinyin_name")
class PrivloraPinyinNameRecognizer(PrivloraRecognizer):
    """Chinese names in pinyin (``Zhang Wei``, ``Xiuying Deng``, ``ZHANG Wei``): a common family name next to a
    one- or two-syllable given name — the small English NER model misses or mislabels many of them."""

    ENTITY = "PERSON"
    _SUR = "|".join(sorted(CN_SURNAMES, key=len, reverse=True))
    _SURNAME = rf"(?:{_SUR}|{_SUR.upper()})"
    PATTERNS = (("pinyin_name", rf"(?<![A-Za-z])(?:{_SURNAME} {_GIVEN}|{_GIVEN} {_SURNAME})(?![A-Za-z'])", 0.9),)

    def validate_result(self, pattern_text: str) -> bool | None:
        return False if all(w in _ENGLISH_PINYIN for w in pattern_text.split()) else None


#: Place names the small NER model often misses or calls a person: countries and common territories, US states,
#: Chinese provinces and large cities, and the world's large cities. Small towns are left to the NER model.
PLACES = tuple(p.strip() for p in """Afghanistan|Albania|Algeria|Andorra|Angola|Antigua and Barbuda|Argentina|Armenia|
Australia|Austria|Azerbaijan|Bahamas|Bahrain|Bangladesh|Barbados|Belarus|Belgium|Belize|Benin|Bhutan|Bolivia|
Bosnia and Herzegovina|Botswana|Brazil|Brunei|Bulgaria|Burkina Faso|Burundi|Cambodia|Cameroon|Canada|Cape Verde|
Central African Republic|Chad|Chile|China|Colombia|Comoros|Congo|Costa Rica|Croatia|Cuba|Cyprus|Czech Republic|Czechia|
Denmark|Djibouti|Dominica|Dominican Republic|Ecuador|Egypt|El Salvador|Equatorial Guinea|Eritrea|Estonia|Eswatini|
Ethiopia|Fiji|Finland|France|Gabon|Gambia|Germany|Ghana|Greece|Grenada|Guatemala|Guinea|Guinea-Bissau|Guyana|Haiti|
Honduras|Hungary|Iceland|India|Indonesia|Iran|Iraq|Ireland|Israel|Italy|Ivory Coast|Jamaica|Japan|Kazakhstan|Kenya|
Kiribati|Kosovo|Kuwait|Kyrgyzstan|Laos|Latvia|Lebanon|Lesotho|Liberia|Libya|Liechtenstein|Lithuania|Luxembourg|
Madagascar|Malawi|Malaysia|Maldives|Mali|Malta|Marshall Islands|Mauritania|Mauritius|Mexico|Micronesia|Moldova|Monaco|
Mongolia|Montenegro|Morocco|Mozambique|Myanmar|Namibia|Nauru|Nepal|Netherlands|New Zealand|Nicaragua|Niger|Nigeria|
North Korea|North Macedonia|Norway|Oman|Pakistan|Palau|Palestine|Panama|Papua New Guinea|Paraguay|Peru|Philippines|
Poland|Portugal|Qatar|Romania|Russia|Rwanda|Saint Kitts and Nevis|Saint Lucia|Saint Vincent and the Grenadines|Samoa|
San Marino|Sao Tome and Principe|Saudi Arabia|Senegal|Serbia|Seychelles|Sierra Leone|Singapore|Slovakia|Slovenia|
Solomon Islands|Somalia|South Africa|South Korea|South Sudan|Spain|Sri Lanka|Sudan|Suriname|Sweden|Switzerland|Syria|
Taiwan|Tajikistan|Tanzania|Thailand|Timor-Leste|Togo|Tonga|Trinidad and Tobago|Tunisia|Turkmenistan|Tuvalu|Uganda|
Ukraine|United Arab Emirates|United Kingdom|United States|United States of America|Uruguay|Uzbekistan|Vanuatu|
Vatican City|Venezuela|Vietnam|Yemen|Zambia|Zimbabwe|Hong Kong|Macau|Macao|Puerto Rico|Greenland|Guam|Bermuda|Aruba|
Gibraltar|Cayman Islands|Faroe Islands|New Caledonia|French Polynesia|Martinique|Guadeloupe|Reunion|Réunion|
Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Hawaii|Idaho|Illinois|Indiana|Iowa|
Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|Michigan|Minnesota|Mississippi|Missouri|Montana|Nebraska|Nevada|
New Hampshire|New Jersey|New Mexico|New York|North Carolina|North Dakota|Ohio|Oklahoma|Oregon|Pennsylvania|Rhode Island|
South Carolina|South Dakota|Tennessee|Texas|Utah|Vermont|Virginia|West Virginia|Wisconsin|Wyoming|District of Columbia|
Beijing|Tianjin|Shanghai|Chongqing|Hebei|Shanxi|Liaoning|Jilin|Heilongjiang|Jiangsu|Zhejiang|Anhui|Fujian|Jiangxi|
Shandong|Henan|Hubei|Hunan|Guangdong|Hainan|Sichuan|Guizhou|Yunnan|Shaanxi|Gansu|Qinghai|Inner Mongolia|Guangxi|Tibet|
Ningxia|Xinjiang|Guangzhou|Shenzhen|Chengdu|Wuhan|Hangzhou|Nanjing|Xi'an|Suzhou|Qingdao|Dalian|Xiamen|Shenyang|Harbin|
Changsha|Zhengzhou|Jinan|Kunming|Hefei|Fuzhou|Ningbo|Dongguan|Foshan|Wuxi|Nanning|Changchun|Shijiazhuang|Taiyuan|
Urumqi|Lanzhou|Guiyang|Nanchang|Hohhot|Lhasa|Haikou|Sanya|Zhuhai|Taipei|Kaohsiung|London|Paris|Berlin|Madrid|Rome|
Vienna|Amsterdam|Brussels|Lisbon|Dublin|Edinburgh|Manchester|Birmingham|Glasgow|Liverpool|Munich|Hamburg|Frankfurt|
Cologne|Stuttgart|Zurich|Geneva|Milan|Naples|Turin|Barcelona|Valencia|Seville|Sevilla|Lyon|Marseille|Toulouse|Prague|
Warsaw|Budapest|Stockholm|Oslo|Copenhagen|Helsinki|Athens|Istanbul|Moscow|Kyiv|Kiev|Tokyo|Osaka|Kyoto|Seoul|Busan|
Bangkok|Hanoi|Ho Chi Minh City|Manila|Jakarta|Kuala Lumpur|Mumbai|Delhi|New Delhi|Bangalore|Bengaluru|Chennai|Kolkata|
Karachi|Lahore|Dhaka|Dubai|Abu Dhabi|Riyadh|Doha|Tehran|Baghdad|Cairo|Lagos|Nairobi|Johannesburg|Cape Town|Casablanca|
Sydney|Melbourne|Brisbane|Perth|Auckland|Toronto|Montreal|Vancouver|Ottawa|Mexico City|Los Angeles|San Francisco|
Chicago|Houston|Philadelphia|Phoenix|San Diego|Dallas|Seattle|Boston|Miami|Atlanta|Denver|Detroit|Las Vegas|
New Orleans|Sao Paulo|São Paulo|Rio de Janeiro|Buenos Aires|Lima|Bogota|Bogotá|Santiago""".split("|"))


@register("place")
class PrivloraPlaceRecognizer(PrivloraRecognizer):
    """Well-known place names from a fixed list (:data:`PLACES`), case-sensitive, whole words."""

    ENTITY = "LOCATION"
    PATTERNS = (("place", r"(?<![\w-])(?:" + "|".join(re.escape(p) for p in sorted(PLACES, key=len, reverse=True))
                 + r")(?![\w-])", 0.9),)
