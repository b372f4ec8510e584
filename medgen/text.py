"""Text that came from the user's files, made safe to show or store.

File names and tag values are attacker-controlled in a shared PACS export: a name holding ANSI
escape sequences can rewrite a terminal, a manifest cell starting with '=' is a formula to a
spreadsheet. These two functions are the only doors such text goes through.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def printable(text: str) -> str:
    """Control characters (C0, DEL, C1: ESC, CR, bell...) escaped as \\xNN, so a terminal shows them."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def neutralise_cell(text: str) -> str:
    """OWASP CSV-injection rule: a cell that would start a formula gets a leading apostrophe."""
    return "'" + text if text.startswith(FORMULA_START) else text


def restore_cell(text: str) -> str:
    """Inverse of `neutralise_cell` (for medgen's own reading of its CSV)."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_START) else text
