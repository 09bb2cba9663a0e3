"""Exact JSON parsing and encoding: no value passes through a float, key order and text are kept."""

from decimal import Decimal

import pytest

from integrations import jsontext


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "-1",
        "9007199254740993",
        "9223372036854775807",
        "-9223372036854775808",
        "18446744073709551615",
        "-8602161397754364000",
    ],
)
def test_integer_parsed_as_int(text):
    value = jsontext.parse(text)

    assert type(value) is int
    assert str(value) == text


@pytest.mark.parametrize("text", ["1.10", "0.1", "-0.0", "42.10", "3.14159265358979323846264338327950288"])
def test_fraction_parsed_as_decimal(text):
    value = jsontext.parse(text)

    assert type(value) is Decimal
    assert str(value) == text


@pytest.mark.parametrize(
    "text",
    ["0", "-1", "9223372036854775807", "-9223372036854775808", "18446744073709551616", "1.10", "-0.0", "0.75"],
)
def test_number_round_trips_exactly(text):
    assert jsontext.encode(jsontext.parse(text)) == text.encode()


@pytest.mark.parametrize(
    ("text", "encoded"),
    [("1e400", b"1E+400"), ("1E5", b"1E+5"), ("2.5E-308", b"2.5E-308"), ("-1e-400", b"-1E-400"), ("100e-2", b"1.00")],
)
def test_exponent_keeps_value_and_digits(text, encoded):
    value = jsontext.parse(text)

    assert jsontext.encode(value) == encoded
    assert value == Decimal(text)


def test_negative_zero_integer_kept():
    assert jsontext.encode(jsontext.parse("[-0,0]")) == b"[-0,0]"


def test_integer_beyond_int_limit_kept():
    text = "7" * 5000

    assert jsontext.encode(jsontext.parse(text)) == text.encode()


def test_negative_integer_beyond_limit_kept():
    text = "-" + "9" * 4400

    assert jsontext.encode(jsontext.parse(f"[{text}]")) == f"[{text}]".encode()


def test_number_strings_stay_strings():
    value = jsontext.parse('{"id":"9223372036854775807","ts":"1717236000000","f":"1.10"}')

    assert value == {"id": "9223372036854775807", "ts": "1717236000000", "f": "1.10"}


def test_key_order_kept():
    text = '{"z":1,"a":{"y":2,"b":3},"m":[{"k":1,"c":2}]}'

    assert jsontext.encode(jsontext.parse(text)) == text.encode()


def test_repeated_key_keeps_last_value():
    assert jsontext.encode(jsontext.parse('{"a":1,"b":2,"a":3}')) == b'{"a":3,"b":2}'


def test_literals_round_trip():
    text = '[null,true,false,"",[],{}]'

    assert jsontext.encode(jsontext.parse(text)) == text.encode()


def test_booleans_stay_booleans():
    assert jsontext.parse("[true,false,1,0]") == [True, False, 1, 0]
    assert [type(value) for value in jsontext.parse("[true,1]")] == [bool, int]


def test_surrogate_pair_decodes_to_astral():
    assert jsontext.parse(r'"Checkout \ud83c\udf54"') == "Checkout \U0001f354"


def test_astral_encoded_as_utf8():
    assert jsontext.encode("Checkout \U0001f354") == '"Checkout 🍔"'.encode()


@pytest.mark.parametrize("text", ["Zürich", "テスト", "Москва", "Café ☕ 🍔", "\u2028\u2029"])
def test_non_ascii_not_escaped(text):
    assert jsontext.encode(text) == f'"{text}"'.encode()


def test_control_characters_escaped():
    assert jsontext.encode('tab\tline\nquote" back\\ nul\x00') == b'"tab\\tline\\nquote\\" back\\\\ nul\\u0000"'


def test_lone_surrogate_parses():
    assert jsontext.parse(r'"\ud83d"') == "\ud83d"


def test_lone_surrogate_encode_raises():
    with pytest.raises(UnicodeEncodeError):
        jsontext.encode({"event_name": "\ud83d"})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), Decimal("NaN"), Decimal("-Infinity")])
def test_non_finite_encode_raises(value):
    with pytest.raises(ValueError, match="not JSON compliant"):
        jsontext.encode([value])


def test_encoding_is_compact():
    assert jsontext.encode({"a": [1, 2], "b": {"c": None}}) == b'{"a":[1,2],"b":{"c":null}}'


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "[1, NaN]"])
def test_non_finite_literals_rejected(text):
    with pytest.raises(jsontext.InvalidJSON):
        jsontext.parse(text)


@pytest.mark.parametrize("text", ["", "{", '{"a":}', "[1,]", "{'a':1}", "01", "1 2", '"\\x"'])
def test_invalid_text_rejected(text):
    with pytest.raises(jsontext.InvalidJSON):
        jsontext.parse(text)


def test_invalid_json_names_position():
    with pytest.raises(jsontext.InvalidJSON, match="line 2 column 5"):
        jsontext.parse('{"a":\n  1,,}')


def test_deep_nesting_rejected():
    with pytest.raises(jsontext.InvalidJSON, match="nested too deeply"):
        jsontext.parse("[" * 100_000 + "]" * 100_000)


def test_invalid_json_is_value_error():
    assert issubclass(jsontext.InvalidJSON, ValueError)
