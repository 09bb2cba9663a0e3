"""JSON parsing and encoding that keep every value exactly as mParticle sent it.

Numbers with a fraction or exponent are parsed as Decimal and integers as
Python int, so no value passes through a float: 64-bit ids and long
fractions keep every digit. Two integers are parsed as Decimal because int
cannot carry them: `-0` (int would drop the sign) and integers longer than
Python's limit for int conversion (4,300 digits by default).

Encoding writes a Decimal in Python's form: `1.10` goes out as `1.10`, but
`1e400` as `1E+400` and `0.0000001` as `1E-7`. The digits and the value
stay the same, and only the notation can change.

Objects keep their key order; of a repeated key, the last value is kept at
the first key's position. Text is encoded as UTF-8 without escapes, which
fails on a lone surrogate (`"\\ud83d"`), since such a string has no UTF-8
form.
"""

from decimal import Decimal
from typing import Any

import simplejson


class InvalidJSON(ValueError):
    """The text is not a JSON document."""


def parse(text: str) -> Any:
    """Parse JSON text; NaN and Infinity are rejected because JSON has no such values."""
    try:
        return simplejson.loads(text, use_decimal=True, allow_nan=False, parse_int=_parse_int)
    except simplejson.JSONDecodeError as error:
        raise InvalidJSON(f"{error.msg} at line {error.lineno} column {error.colno}") from error
    except RecursionError as error:
        raise InvalidJSON("nested too deeply") from error


def _parse_int(text: str) -> int | Decimal:
    if text == "-0":
        return Decimal(text)
    try:
        return int(text)
    except ValueError:
        # More digits than sys.get_int_max_str_digits() allows.
        return Decimal(text)


def encode(value: Any) -> bytes:
    """Encode `value` as compact UTF-8 JSON.

    Raises UnicodeEncodeError for a lone surrogate and ValueError for NaN or
    an infinity (float or Decimal).
    """
    text = simplejson.dumps(value, ensure_ascii=False, use_decimal=True, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def replace_lone_surrogates(value: Any) -> Any:
    """Return a copy of `value` in which every lone surrogate in keys and strings is U+FFFD."""
    if isinstance(value, str):
        if not _has_surrogate(value):
            return value
        return "".join("\ufffd" if _is_surrogate(char) else char for char in value)
    if isinstance(value, dict):
        return {replace_lone_surrogates(key): replace_lone_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [replace_lone_surrogates(item) for item in value]
    return value


def _is_surrogate(char: str) -> bool:
    return "\ud800" <= char <= "\udfff"


def _has_surrogate(text: str) -> bool:
    return any(_is_surrogate(char) for char in text)


def pretty(text: str) -> str:
    """Return JSON text indented for reading, with every number and string exactly as in `text`."""
    return simplejson.dumps(parse(text), indent=2, ensure_ascii=False, use_decimal=True)
