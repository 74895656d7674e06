"""Device labels (``key=value``) and label selectors (``site=berlin,model!=th-100,beta``): parsing and matching. No I/O.

A key or a value is 1-63 of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit; a device has at most
`MAX_LABELS` labels. A selector is up to `MAX_TERMS` comma-separated terms, all of which must match: ``key=value``
(the device has the label), ``key!=value`` (it has not: a device without the key matches), or ``key`` alone (it has
the key, with any value). docs/control.md, "Labels and selectors".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import attrs

from hub.fleet._accounts import RegistryError

__all__ = [
    "LABEL_RE",
    "MAX_LABELS",
    "MAX_SELECTOR_LEN",
    "MAX_TERMS",
    "BadLabel",
    "Selector",
    "apply_labels",
    "check_label_key",
    "check_labels",
    "parse_label",
    "parse_selector",
]

#: A label key or value.
LABEL_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
#: Labels one device may carry.
MAX_LABELS = 16
#: Terms in one selector, and its length in characters (room for `MAX_TERMS` of the longest terms, with spaces).
MAX_TERMS = 16
MAX_SELECTOR_LEN = 4096

_LABEL = re.compile(LABEL_RE)
_RULE = "1-63 of A-Z a-z 0-9 _ . -, starting with a letter or digit"


class BadLabel(RegistryError):
    """A label, a label key or a selector is malformed, or a device would carry more than `MAX_LABELS` labels."""


def _show(text: object) -> str:
    return repr(text[:70] if isinstance(text, str) else text)


def check_label_key(key: object) -> str:
    """`key` if it is a valid label key; else BadLabel."""
    if not isinstance(key, str) or not _LABEL.fullmatch(key):
        raise BadLabel(f"bad label key {_show(key)}: use {_RULE}")
    return key


def _check_value(key: str, value: object) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise BadLabel(f"bad value {_show(value)} of label {key!r}: use {_RULE}")
    return value


def check_labels(labels: object) -> dict[str, str]:
    """The labels of a JSON object (key -> value), checked, at most `MAX_LABELS`; else BadLabel."""
    if not isinstance(labels, Mapping):
        raise BadLabel("labels are an object of key -> value")
    if len(labels) > MAX_LABELS:
        raise BadLabel(f"at most {MAX_LABELS} labels per device")
    return {check_label_key(key): _check_value(key, value) for key, value in labels.items()}


def parse_label(text: str) -> tuple[str, str]:
    """``(key, value)`` of a ``key=value`` argument; else BadLabel."""
    key, eq, value = text.partition("=")
    if not eq:
        raise BadLabel(f"bad label {_show(text)}: write key=value")
    return check_label_key(key), _check_value(key, value)


def apply_labels(labels: Mapping[str, str], set_: Mapping[str, str], remove: Iterable[str]) -> dict[str, str]:
    """`labels` with `remove` taken out, then `set_` added (both already checked); BadLabel past `MAX_LABELS`."""
    gone = set(remove)
    out = {key: value for key, value in labels.items() if key not in gone}
    out.update(set_)
    if len(out) > MAX_LABELS:
        raise BadLabel(f"at most {MAX_LABELS} labels per device (this would make {len(out)})")
    return dict(sorted(out.items()))


@attrs.frozen
class Selector:
    """A parsed selector: terms ``(key, op, value)`` with op "=", "!=" or "" (has the key; value "")."""

    terms: tuple[tuple[str, str, str], ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a device with `labels` is selected: every term matches."""
        for key, op, value in self.terms:
            have = labels.get(key)
            if op == "=" and have != value:
                return False
            if op == "!=" and have == value:
                return False
            if op == "" and have is None:
                return False
        return True

    def __str__(self) -> str:
        return ",".join(f"{key}{op}{value}" for key, op, value in self.terms)


def parse_selector(text: object) -> Selector:
    """The selector of ``"key=value,key!=value,key"``; BadLabel if it is empty or malformed."""
    if not isinstance(text, str) or not text.strip():
        raise BadLabel("a selector is key=value, key!=value or key terms, comma-separated")
    if len(text) > MAX_SELECTOR_LEN:
        raise BadLabel(f"a selector is at most {MAX_SELECTOR_LEN} characters")
    parts = text.split(",")
    if len(parts) > MAX_TERMS:
        raise BadLabel(f"a selector has at most {MAX_TERMS} terms")
    terms = []
    for part in parts:
        term = part.strip()
        if "!=" in term:
            key, _, value = term.partition("!=")
            op = "!="
        elif "=" in term:
            key, _, value = term.partition("=")
            op = "="
        else:
            key, op, value = term, "", ""
        check_label_key(key.strip())
        if op:
            _check_value(key.strip(), value.strip())
        terms.append((key.strip(), op, value.strip()))
    return Selector(tuple(terms))
