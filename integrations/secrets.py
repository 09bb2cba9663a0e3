"""Masking of secrets for display: the admin, the API, logs and attempt records."""

from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

MASK = "••••"


def mask_secret(value: str | None) -> str:
    """Return `value` with all but its last 4 characters hidden; short values are hidden whole."""
    if not value:
        return ""
    if len(value) <= 8:
        return MASK
    return MASK + value[-4:]


def mask_url(url: str | None) -> str:
    """Return `url` with every query value masked, so a trigger URL's token never shows in full."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        query = [(key, mask_secret(value)) for key, value in parse_qsl(parts.query, keep_blank_values=True)]
        masked_query = urlencode(query).replace(quote_plus(MASK), MASK)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, masked_query, ""))
    except ValueError:
        return mask_secret(url)
