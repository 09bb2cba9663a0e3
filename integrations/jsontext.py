"""JSON parsing and encoding that keep every value exactly as mParticle sent it.

Numbers with a fraction or exponent are parsed as Decimal and integers as
Python int, so no value passes through a float: 64-bit ids and long
fractions keep every digit. Objects keep their key order. Text is encoded
as UTF-8 without escapes, which fails on a lone surrogate (`"\\ud83d"`),
since such a string has no UTF-8 form.
"""

from typing import Any

import simplejson


class InvalidJSON(ValueError):
    """The text is not a JSON document."""


def parse(text: str) -> Any:
    """Parse JSON text; NaN and Infinity are rejected because JSON has no such values."""
    try:
        return simplejson.loads(text, use_decimal=True, allow_nan=False)
    except simplejson.JSONDecodeError as error:
        raise InvalidJSON(f"{error.msg} at line {error.lineno} column {error.colno}") from error
    except RecursionError as error:
        raise InvalidJSON("nested too deeply") from error


def encode(value: Any) -> bytes:
    """Encode `value` as compact UTF-8 JSON; raises UnicodeEncodeError for a lone surrogate."""
    text = simplejson.dumps(value, ensure_ascii=False, use_decimal=True, separators=(",", ":"))
    return text.encode("utf-8")
