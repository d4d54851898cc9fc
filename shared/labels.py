"""Text that reads as what it holds: the characters no label or name in a migration
document may contain, found in one regex pass, and named in a message by code point."""

from __future__ import annotations

import re
import unicodedata

# Characters no label or name may hold: they are invisible or reorder what is shown, so
# that one text reads as another in a list, a log or a terminal (CVE-2021-42574, "Trojan
# Source"). By class, for the message; one regex of all of them for speed and for the JSON
# Schema (ECMA-262 without the u flag: an astral range is spelled as its surrogates).
_HIDDEN_CLASSES = (
    ("a C0 control character", "\\u0000-\\u001f"),
    ("a C1 control character", "\\u007f-\\u009f"),
    ("a bidirectional control", "\\u061c\\u200e\\u200f\\u202a-\\u202e\\u2066-\\u2069"),
    ("a zero-width character", "\\u200b-\\u200d\\u2060\\ufeff"),
    ("an invisible format character", "\\u2061-\\u2064\\u206a-\\u206f"),
    ("a line or paragraph separator", "\\u2028\\u2029"),
    ("an unpaired surrogate", "\\ud800-\\udfff"),  # JSON allows "\\ud800"; UTF-8 cannot hold it
    ("an invisible tag character", "\\U000e0000-\\U000e007f"),  # "ASCII smuggling"
)
_HIDDEN = re.compile("[" + "".join(chars for _, chars in _HIDDEN_CLASSES) + "]")
_HIDDEN_CLASS = [(re.compile(f"[{chars}]"), what) for what, chars in _HIDDEN_CLASSES]
_BMP_HIDDEN = "".join(chars for _, chars in _HIDDEN_CLASSES[:-1])
LABEL_JSON_PATTERN = (  # a surrogate only in a pair, and that pair not a tag character
    f"^(?:[^{_BMP_HIDDEN}]|[\\ud800-\\udb3f\\udb41-\\udbff][\\udc00-\\udfff]"
    "|\\udb40[\\udc80-\\udfff])*$"
)


def hidden_character(value: str) -> str | None:
    """The first hidden character in `value` and where, for a message; None if none."""
    found = _HIDDEN.search(value)
    if found is None:
        return None
    char = found.group()
    kind = next(name for regex, name in _HIDDEN_CLASS if regex.match(char))
    name = unicodedata.name(char, "")
    return (f"U+{ord(char):04X}{' ' + name if name else ''} ({kind}) "
            f"at character {found.start() + 1}")
