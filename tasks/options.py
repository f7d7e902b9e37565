"""Parsers for option values that several stages share."""

from tasks.errors import ConfigError


def parse_year_range(text: str, option: str = "--years") -> tuple[int, int]:
    """Parse `FIRST-LAST`, such as `2004-2014`, into two inclusive years."""
    try:
        first, last = (int(part) for part in text.split("-"))
    except ValueError as error:
        raise ConfigError(f"invalid {option} {text!r}: expected FIRST-LAST, for example "
                          "2004-2014") from error
    if first > last:
        raise ConfigError(f"invalid {option} {text!r}: the first year is after the last")
    return first, last
