"""HuJSON ("human JSON"): JSON plus comments and trailing commas, parsed by hand.

Tailscale-style policy files are written in HuJSON. We parse it ourselves, rather than stripping
comments and calling :mod:`json`, for two reasons: errors must carry the exact line and column of
the problem, and the policy compiler needs the source position of every object member and array
element so that a *semantic* error ("unknown group") can point at the offending text too.

Grammar accepted (RFC 8259 JSON, extended):

* ``// comment`` to the end of the line and ``/* block comment */`` (not nested) wherever
  whitespace is allowed;
* one trailing comma after the last member of an object or the last element of an array;
* a leading UTF-8 byte-order mark is ignored.

Everything else is strict JSON: double-quoted strings only, escapes ``\\" \\\\ \\/ \\b \\f \\n \\r
\\t \\uXXXX`` (surrogate pairs combined; a lone surrogate is an error), no raw control characters
in strings, JSON number syntax, no NaN/Infinity, no duplicate object keys (a policy with two
``"acls"`` keys is almost certainly a mistake; JSON leaves it undefined, we reject it).

Positions are 1-based; a column counts characters (code points), not bytes, and a tab is one
column. :func:`parse_document` returns the value plus a side table mapping each *path* (a tuple of
object keys and array indices from the root, e.g. ``("acls", 2, "dst", 0)``) to the position where
that value starts. For object members the key's position is recorded as well (useful for "unknown
key" errors).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Document", "HuJSONError", "Path", "Pos", "parse", "parse_document"]

# Nesting deeper than this is refused rather than hitting Python's recursion limit: a policy file
# never needs more than a handful of levels, and a hostile input must produce a HuJSONError.
MAX_DEPTH = 256

Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Pos:
    """A 1-based line and column in the source text."""

    line: int
    column: int

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}"


class HuJSONError(ValueError):
    """Malformed HuJSON, with the line and column where parsing stopped."""

    def __init__(self, line: int, column: int, reason: str) -> None:
        super().__init__(f"line {line}, column {column}: {reason}")
        self.line = line
        self.column = column
        self.reason = reason


@dataclass
class Document:
    """A parsed HuJSON value and where each part of it came from."""

    value: Any
    positions: dict[Path, Pos] = field(default_factory=dict)
    key_positions: dict[Path, Pos] = field(default_factory=dict)

    def pos(self, path: Path) -> Pos:
        """Position of the value at ``path``, or of its nearest ancestor that has one."""
        p = path
        while True:
            found = self.positions.get(p)
            if found is not None:
                return found
            if not p:
                return Pos(1, 1)
            p = p[:-1]

    def key_pos(self, path: Path) -> Pos:
        """Position of the object key naming ``path`` (falls back to the value's position)."""
        found = self.key_positions.get(path)
        return found if found is not None else self.pos(path)


_WS = frozenset(" \t\n\r")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")


class _Parser:
    def __init__(self, text: str) -> None:
        if text.startswith("\ufeff"):
            text = text[1:]
        self.text = text
        self.i = 0
        self.n = len(text)
        # Offsets at which each line starts, for offset -> (line, column) by bisection; computing
        # positions lazily keeps the hot loop free of line bookkeeping.
        self.line_starts = [0]
        start = text.find("\n")
        while start != -1:
            self.line_starts.append(start + 1)
            start = text.find("\n", start + 1)
        self.positions: dict[Path, Pos] = {}
        self.key_positions: dict[Path, Pos] = {}

    # -- positions and errors ------------------------------------------------------------------

    def pos_at(self, offset: int) -> Pos:
        line = bisect.bisect_right(self.line_starts, offset) - 1
        return Pos(line + 1, offset - self.line_starts[line] + 1)

    def error(self, reason: str, offset: int | None = None) -> HuJSONError:
        p = self.pos_at(self.i if offset is None else offset)
        return HuJSONError(p.line, p.column, reason)

    def describe(self) -> str:
        if self.i >= self.n:
            return "end of input"
        return f"{self.text[self.i]!r}"

    # -- lexical helpers -----------------------------------------------------------------------

    def skip_ws(self) -> None:
        text, n = self.text, self.n
        while self.i < n:
            c = text[self.i]
            if c in _WS:
                self.i += 1
            elif c == "/":
                nxt = text[self.i + 1] if self.i + 1 < n else ""
                if nxt == "/":
                    end = text.find("\n", self.i + 2)
                    self.i = n if end == -1 else end + 1
                elif nxt == "*":
                    end = text.find("*/", self.i + 2)
                    if end == -1:
                        raise self.error("unterminated /* comment")
                    self.i = end + 2
                else:
                    raise self.error("unexpected '/' (a comment starts with // or /*)")
            else:
                return

    # -- grammar -------------------------------------------------------------------------------

    def parse_root(self) -> Any:
        self.skip_ws()
        if self.i >= self.n:
            raise self.error("empty document: expected a value")
        value = self.parse_value((), 0)
        self.skip_ws()
        if self.i < self.n:
            raise self.error(f"unexpected {self.describe()} after the top-level value")
        return value

    def parse_value(self, path: Path, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.error(f"nesting deeper than {MAX_DEPTH} levels")
        if self.i >= self.n:
            raise self.error("unexpected end of input: expected a value")
        self.positions[path] = self.pos_at(self.i)
        c = self.text[self.i]
        if c == "{":
            return self.parse_object(path, depth)
        if c == "[":
            return self.parse_array(path, depth)
        if c == '"':
            return self.parse_string()
        if c == "-" or c in _DIGITS:
            return self.parse_number()
        for word, value in (("true", True), ("false", False), ("null", None)):
            if self.text.startswith(word, self.i):
                end = self.i + len(word)
                if end < self.n and (self.text[end].isalnum() or self.text[end] == "_"):
                    break
                self.i = end
                return value
        raise self.error(f"unexpected {self.describe()}: expected a value")

    def parse_object(self, path: Path, depth: int) -> dict[str, Any]:
        self.i += 1  # '{'
        out: dict[str, Any] = {}
        while True:
            self.skip_ws()
            if self.i >= self.n:
                raise self.error("unterminated object: expected '}'")
            if self.text[self.i] == "}":
                self.i += 1
                return out
            if self.text[self.i] != '"':
                raise self.error(f"unexpected {self.describe()}: expected a string key or '}}'")
            key_offset = self.i
            key = self.parse_string()
            if key in out:
                raise self.error(f"duplicate key {key!r}", key_offset)
            self.key_positions[(*path, key)] = self.pos_at(key_offset)
            self.skip_ws()
            if self.i >= self.n or self.text[self.i] != ":":
                raise self.error(f"unexpected {self.describe()}: expected ':' after key")
            self.i += 1
            self.skip_ws()
            out[key] = self.parse_value((*path, key), depth + 1)
            self.skip_ws()
            if self.i >= self.n:
                raise self.error("unterminated object: expected ',' or '}'")
            c = self.text[self.i]
            if c == ",":
                self.i += 1
            elif c == "}":
                self.i += 1
                return out
            else:
                raise self.error(f"unexpected {self.describe()}: expected ',' or '}}'")

    def parse_array(self, path: Path, depth: int) -> list[Any]:
        self.i += 1  # '['
        out: list[Any] = []
        while True:
            self.skip_ws()
            if self.i >= self.n:
                raise self.error("unterminated array: expected ']'")
            if self.text[self.i] == "]":
                self.i += 1
                return out
            if self.text[self.i] == ",":
                raise self.error("unexpected ',': expected a value or ']'")
            out.append(self.parse_value((*path, len(out)), depth + 1))
            self.skip_ws()
            if self.i >= self.n:
                raise self.error("unterminated array: expected ',' or ']'")
            c = self.text[self.i]
            if c == ",":
                self.i += 1
            elif c == "]":
                self.i += 1
                return out
            else:
                raise self.error(f"unexpected {self.describe()}: expected ',' or ']'")

    def parse_string(self) -> str:
        text, n = self.text, self.n
        start = self.i
        self.i += 1  # opening quote
        parts: list[str] = []
        run = self.i
        while True:
            if self.i >= n:
                raise self.error("unterminated string", start)
            c = text[self.i]
            if c == '"':
                parts.append(text[run : self.i])
                self.i += 1
                return "".join(parts)
            if c == "\\":
                parts.append(text[run : self.i])
                parts.append(self.parse_escape())
                run = self.i
            elif c < " ":
                raise self.error(f"raw control character {c!r} in string (escape it)")
            else:
                self.i += 1

    def parse_escape(self) -> str:
        esc_at = self.i
        self.i += 1  # backslash
        if self.i >= self.n:
            raise self.error("unterminated string", esc_at)
        c = self.text[self.i]
        simple = _ESCAPES.get(c)
        if simple is not None:
            self.i += 1
            return simple
        if c != "u":
            raise self.error(f"invalid escape '\\{c}'", esc_at)
        code = self.read_hex4(esc_at)
        if 0xD800 <= code <= 0xDBFF:
            if self.text.startswith("\\u", self.i):
                low_at = self.i
                self.i += 1
                low = self.read_hex4(low_at)
                if 0xDC00 <= low <= 0xDFFF:
                    return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00))
                raise self.error("high surrogate not followed by a low surrogate", esc_at)
            raise self.error("lone high surrogate in \\u escape", esc_at)
        if 0xDC00 <= code <= 0xDFFF:
            raise self.error("lone low surrogate in \\u escape", esc_at)
        return chr(code)

    def read_hex4(self, esc_at: int) -> int:
        """Read the 4 hex digits after a ``\\u`` (self.i points at the 'u')."""
        digits = self.text[self.i + 1 : self.i + 5]
        if len(digits) != 4 or any(d not in _HEX for d in digits):
            raise self.error("\\u escape needs exactly 4 hex digits", esc_at)
        self.i += 5
        return int(digits, 16)

    def parse_number(self) -> int | float:
        text, n = self.text, self.n
        start = self.i
        if text[self.i] == "-":
            self.i += 1
        if self.i >= n or text[self.i] not in _DIGITS:
            raise self.error("invalid number: expected a digit", self.i)
        if text[self.i] == "0":
            self.i += 1
            if self.i < n and text[self.i] in _DIGITS:
                raise self.error("invalid number: leading zero", start)
        else:
            while self.i < n and text[self.i] in _DIGITS:
                self.i += 1
        is_float = False
        if self.i < n and text[self.i] == ".":
            is_float = True
            self.i += 1
            if self.i >= n or text[self.i] not in _DIGITS:
                raise self.error("invalid number: expected a digit after '.'", self.i)
            while self.i < n and text[self.i] in _DIGITS:
                self.i += 1
        if self.i < n and text[self.i] in "eE":
            is_float = True
            self.i += 1
            if self.i < n and text[self.i] in "+-":
                self.i += 1
            if self.i >= n or text[self.i] not in _DIGITS:
                raise self.error("invalid number: expected a digit in the exponent", self.i)
            while self.i < n and text[self.i] in _DIGITS:
                self.i += 1
        literal = text[start : self.i]
        return float(literal) if is_float else int(literal)


def parse_document(text: str) -> Document:
    """Parse HuJSON ``text`` into a :class:`Document` (value plus position side tables).

    Raises :class:`HuJSONError` with the line and column of the first problem.
    """
    p = _Parser(text)
    value = p.parse_root()
    return Document(value=value, positions=p.positions, key_positions=p.key_positions)


def parse(text: str) -> Any:
    """Parse HuJSON ``text`` into plain Python values (dict, list, str, int, float, bool, None)."""
    return parse_document(text).value
