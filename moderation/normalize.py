"""Stage 1 of the input cascade: undo the cheap tricks that hide an attack from later stages.

`text_normalize` returns the canonical text (NFKC, invisible and control characters removed,
homoglyphs folded) plus decoded *variants* (base64, hex, URL-encoding, rot13, leetspeak,
spaced-out letters, Unicode tag characters). The rules inspect every variant; the classifier
embeds the canonical text and any variant, so an attack wrapped in an encoding is judged on
its decoded content. Nothing here decides anything; it only prepares text for inspection.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import unquote

# Characters that render as nothing but split words for a regex or a tokenizer.
_INVISIBLE = {
    0x00AD,  # soft hyphen
    0x034F,  # combining grapheme joiner
    0x061C,  # Arabic letter mark
    0x115F, 0x1160, 0x17B4, 0x17B5,
    0x180E,  # Mongolian vowel separator
    0x200B, 0x200C, 0x200D, 0x200E, 0x200F,  # zero-width space/joiners, LRM/RLM
    0x202A, 0x202B, 0x202C, 0x202D, 0x202E,  # bidi embeddings and overrides
    0x2060, 0x2061, 0x2062, 0x2063, 0x2064,  # word joiner, invisible operators
    0x2066, 0x2067, 0x2068, 0x2069,  # bidi isolates
    0x3164, 0xFEFF, 0xFFA0,
}
_KEEP_CONTROLS = {"\n", "\t"}
# Unicode "tag" characters (U+E0020..U+E007E) mirror ASCII invisibly: a known smuggling trick.
_TAG_FIRST, _TAG_LAST = 0xE0020, 0xE007E

# Cyrillic, Greek and other letters that look like Latin ones. NFKC does not fold these.
_HOMOGLYPHS = str.maketrans(
    {
        # Cyrillic lower case
        "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j",
        "к": "k", "ӏ": "l", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "ѕ": "s",
        "т": "t", "у": "y", "х": "x", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g", "ь": "b",
        # Cyrillic upper case
        "А": "A", "В": "B", "Е": "E", "Ё": "E", "Һ": "H", "І": "I", "Ї": "I", "Ј": "J",
        "К": "K", "Ӏ": "I", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Ѕ": "S",
        "Т": "T", "У": "Y", "Х": "X", "Ԁ": "D", "Ԛ": "Q", "Ԝ": "W",
        # Greek
        "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
        "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ω": "w",
        "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M",
        "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
        # Latin extensions and symbols that pass for ASCII letters
        "ı": "i", "ȷ": "j", "ℓ": "l", "∂": "d", "ø": "o", "Ø": "O",
    }
)
_HOMOGLYPH_SEARCH = re.compile("[" + "".join(chr(c) for c in _HOMOGLYPHS) + "]")
_LATIN_LETTER = re.compile(r"[A-Za-z]")
_ANY_LETTER = re.compile(r"[^\W\d_]")
_WORD = re.compile(r"\w+", re.UNICODE)

_BASE64_BLOB = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
_HEX_BLOB = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[\s:]?){12,}(?![0-9A-Fa-f])")
_URL_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# Five or more single letters separated by one space or one punctuation mark: "i g n o r e"
# ("i_g_n_o_r_e" too: the underscore is a separator here, not a letter, (?<![^\W_]) below).
_SPACED_LETTERS = re.compile(r"(?<![^\W_])(?:[A-Za-z][ .\-_*|]){4,}[A-Za-z](?![^\W_])")
# In a text that spells words out, its short words are spelled out too ("a l l", "m o d e").
_SPACED_SHORT_WORD = re.compile(r"(?<![^\W_])(?:[A-Za-z][ .\-_*|]){1,3}[A-Za-z](?![^\W_])")
# The gap between two spelled-out words written with punctuation: "i.g.n.o.r.e. .a.l.l".
_SPACED_PUNCTUATION_GAP = re.compile(r"(?<=\w)([.\-_*|])\s+\1(?=\w)")
_LEET_WORD = re.compile(
    r"(?<![\w@$!|])(?=[A-Za-z0-9@$!|]*[0-9@$!|])(?=[A-Za-z0-9@$!|]*[A-Za-z][0-9@$!|]*[A-Za-z])"
    r"[A-Za-z0-9@$!|]{3,20}(?![\w@$!|])"
)
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b",
                       "9": "g", "@": "a", "$": "s", "!": "i", "|": "l"})

# Frequent English words: rot13 text is adopted as a variant only if decoding makes it English.
_COMMON_WORDS = frozenset(
    """the be to of and a in that have i it for not on with he as you do at this but his by
    from they we say her she or an will my one all would there their what so up out if about who
    get which go me when make can like time no just him know take people into year your good
    some could them see other than then now look only come its over think also back after use
    two how our work first well way even new want because any these give day most us is are was
    were been has had did ignore previous instructions tell write how make show give""".split()  # noqa: SIM905
)

# Keep inspection bounded: an adversary must not be able to make normalisation the slow stage.
MAX_VARIANTS = 6
MAX_DECODED_BLOBS = 4
_ROT13_PROBE_CHARS = 400


@dataclass(frozen=True)
class Variant:
    kind: str  # "base64" | "hex" | "url" | "rot13" | "leetspeak" | "spaced" | "tags"
    text: str


@dataclass(frozen=True)
class NormalizedText:
    text: str
    variants: tuple[Variant, ...] = ()
    # Which tricks were seen (zero_width, homoglyph, ...); moderators see these on a case.
    tricks: frozenset[str] = field(default_factory=frozenset)

    def all_texts(self) -> list[str]:
        return [self.text, *(variant.text for variant in self.variants)]


def _hidden_char_class() -> re.Pattern:
    """One character class for every invisible, control, format and private-use character."""
    ranges = [(0x00, 0x08), (0x0B, 0x1F), (0x7F, 0x9F), (0xE000, 0xF8FF), (0xE0000, 0xE007F),
              (0xF0000, 0x10FFFF)]
    ranges += [(code, code) for code in _INVISIBLE]
    ranges += [
        (code, code)
        for code in range(0xA0, 0x10000)
        if unicodedata.category(chr(code)) == "Cf" and code not in _INVISIBLE
    ]
    body = "".join(
        re.escape(chr(low)) if low == high else f"{re.escape(chr(low))}-{re.escape(chr(high))}"
        for low, high in ranges
    )
    return re.compile(f"[{body}]")


_HIDDEN = _hidden_char_class()


def _strip_invisible(text: str) -> tuple[str, str, set[str]]:
    """Drop invisible/control characters; return (kept text, decoded tag payload, tricks)."""
    if not _HIDDEN.search(text):
        return text, "", set()
    tags: list[str] = []
    tricks: set[str] = set()

    def drop(match: re.Match) -> str:
        code = ord(match.group(0))
        if _TAG_FIRST <= code <= _TAG_LAST:
            tags.append(chr(code - 0xE0000))
            tricks.add("tag_characters")
        elif code in _INVISIBLE or 0xE0000 <= code <= 0xE007F:
            tricks.add("zero_width")
        else:
            tricks.add("control_characters")
        return ""

    return _HIDDEN.sub(drop, text), "".join(tags), tricks


def _fold_homoglyphs(text: str) -> tuple[str, bool]:
    """Fold lookalikes in words that mix them with Latin letters, or everywhere in Latin text.

    A Russian or Greek sentence is left alone; a Latin sentence with a Cyrillic "о" is not.
    """
    if not _HOMOGLYPH_SEARCH.search(text):
        return text, False
    latin = len(_LATIN_LETTER.findall(text))
    letters = len(_ANY_LETTER.findall(text)) or 1
    if latin / letters >= 0.5:
        folded = text.translate(_HOMOGLYPHS)
        return folded, folded != text

    def fold_mixed(match: re.Match) -> str:
        word = match.group(0)
        if any("a" <= char.lower() <= "z" for char in word):
            return word.translate(_HOMOGLYPHS)
        return word

    folded = _WORD.sub(fold_mixed, text)
    return folded, folded != text


def _printable_share(text: str) -> float:
    if not text:
        return 0.0
    printable = sum(1 for char in text if char.isprintable() or char in "\n\t")
    return printable / len(text)


def _decode_bytes(raw: bytes) -> str | None:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    letters = sum(1 for char in decoded if char.isalpha() or char == " ")
    # Random bytes and binary payloads are not "text hidden in an encoding".
    if len(decoded) < 4 or _printable_share(decoded) < 0.95 or letters / len(decoded) < 0.6:
        return None
    return decoded


def _decode_base64_blobs(text: str) -> list[str]:
    found: list[str] = []
    for match in _BASE64_BLOB.finditer(text):
        blob = match.group(0)
        # Identifiers and words are long runs of letters too; real base64 mixes cases/digits.
        if blob.isalpha() and (blob.islower() or blob.isupper()):
            continue
        padded = blob + "=" * (-len(blob) % 4)
        try:
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            continue
        decoded = _decode_bytes(raw)
        if decoded:
            found.append(decoded)
        if len(found) >= MAX_DECODED_BLOBS:
            break
    return found


def _decode_hex_blobs(text: str) -> list[str]:
    found: list[str] = []
    for match in _HEX_BLOB.finditer(text):
        digits = re.sub(r"[\s:]", "", match.group(0))
        if len(digits) % 2:
            continue
        decoded = _decode_bytes(bytes.fromhex(digits))
        if decoded:
            found.append(decoded)
        if len(found) >= MAX_DECODED_BLOBS:
            break
    return found


def _english_word_count(text: str) -> int:
    return sum(1 for word in _WORD.findall(text.lower()) if word in _COMMON_WORDS)


def _rot13_variant(text: str) -> str | None:
    head = text[:_ROT13_PROBE_CHARS]
    before = _english_word_count(head)
    # Plain English (the common case) is decided on a short probe, without rotating anything.
    if before >= 8 or not re.search(r"[A-Za-z]{3,}", head):
        return None
    after = _english_word_count(codecs.decode(head, "rot13"))
    if not (after >= 3 and after > 2 * before):
        return None
    rotated = codecs.decode(text, "rot13")
    # rot13 of English is not English; adopt it only when decoding clearly reveals English.
    return rotated


def _leetspeak_variant(text: str) -> str | None:
    changed = False

    def unleet(match: re.Match) -> str:
        nonlocal changed
        word = match.group(0)
        # Needs two letters and a substitute ("4ll", "pr3v10u5"); "10px" or "0x1F" is code.
        letters = sum(1 for char in word if char.isalpha())
        if letters < 2 or letters == len(word) or word.lower().startswith("0x"):
            return word
        changed = True
        return word.translate(_LEET)

    decoded = _LEET_WORD.sub(unleet, text)
    return decoded if changed else None


def _spaced_variant(text: str) -> str | None:
    if not _SPACED_LETTERS.search(text):
        return None

    def join(match: re.Match) -> str:
        return re.sub(r"[ .\-_*|]", "", match.group(0))

    # Words are usually separated by a wider gap ("i g n o r e   a l l", "i.g.n.o.r.e. .a.l.l");
    # keep those as spaces.
    collapsed = re.sub(r"\s{2,}|\s*/\s*", "  ", text)
    collapsed = _SPACED_PUNCTUATION_GAP.sub("  ", collapsed)
    # The five-letter runs show the trick; the short words between them are read with them
    # (joined alone, "a l l" stayed apart and "ignore all previous instructions" went unread).
    joined = _SPACED_SHORT_WORD.sub(join, _SPACED_LETTERS.sub(join, collapsed))
    return re.sub(r"\s{2,}", " ", joined).strip()


def text_normalize(text: str) -> NormalizedText:
    """Canonical text plus decoded variants to inspect. Pure, cheap, never raises on input."""
    stripped, tag_payload, tricks = _strip_invisible(text)
    canonical = unicodedata.normalize("NFKC", stripped)
    if canonical != stripped:
        tricks.add("compatibility_forms")
    canonical, folded = _fold_homoglyphs(canonical)
    if folded:
        tricks.add("homoglyph")
    # Spaced-out letters are read before whitespace is collapsed: wide gaps separate words.
    spaced = _spaced_variant(canonical)
    canonical = re.sub(r"[ \t]{2,}", " ", canonical).strip()

    variants: list[Variant] = []
    if tag_payload.strip():
        variants.append(Variant("tags", tag_payload))
    variants += [Variant("base64", decoded) for decoded in _decode_base64_blobs(canonical)]
    variants += [Variant("hex", decoded) for decoded in _decode_hex_blobs(canonical)]
    if len(_URL_ESCAPE.findall(canonical)) >= 3:
        variants.append(Variant("url", unquote(canonical)))
    for kind, decoded in (
        ("rot13", _rot13_variant(canonical)),
        ("leetspeak", _leetspeak_variant(canonical)),
        ("spaced", spaced),
    ):
        if decoded and decoded != canonical:
            variants.append(Variant(kind, decoded))
    tricks.update(variant.kind for variant in variants)
    return NormalizedText(
        text=canonical, variants=tuple(variants[:MAX_VARIANTS]), tricks=frozenset(tricks)
    )
