"""Parsers for option values that several stages share."""

import re

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


# Names that become one path component under the artifact root: no '/', no '.' or '..'.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def validate_name(value: str, option: str) -> str:
    """Check a split, run or dataset name that becomes a folder under the artifact root."""
    if not NAME_PATTERN.match(value):
        raise ConfigError(f"invalid {option} {value!r}: use letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit")
    return value


def require_minimum(options: dict[str, int | None], minimum: int = 1) -> None:
    """Raise ConfigError for the first option below `minimum`; None means not given."""
    for option, value in options.items():
        if value is not None and value < minimum:
            raise ConfigError(f"{option} must be at least {minimum}, got {value}")
