"""containerd's filter language (SPEC §1.5): parse once, match many.

``walk`` on snapshots, content ``list`` and ``list_statuses`` all take a list
of filter strings.  :func:`parse` turns that list into one immutable
:class:`Filter`; each object is then matched through an :data:`Adaptor`, a
function that answers "what is the value of this field path, and is it
there at all?".  Keeping the grammar apart from the objects means one parser
serves every store, and a filter is parsed (and its regexps compiled) once
per request instead of once per object.

Grammar
=======
::

    filter    := ""                               (matches everything)
               | selector ("," selector)*         (all must match)
    selector  := fieldpath [operator value]       (no operator: presence)
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_-]+ | double-quoted
    operator  := "==" | "!=" | "~="
    value     := double-quoted | run of printable characters except space and ","
               | "/…/" or "|…|"                   (after "~=" only)

A list of filters matches when any of them matches; an empty list matches
everything.  Quoted strings take Go's escapes (``\\a \\b \\f \\n \\r \\t \\v
\\\\``, the quote itself, ``\\ooo`` and ``\\xhh`` bytes, ``\\uhhhh`` and
``\\Uhhhhhhhh`` characters); any other escape is an error, also inside
``/…/``, exactly as in containerd (write ``\\\\d`` or leave the regexp
unquoted).  ``"``, ``/`` and ``|`` open a quoted string wherever a field or
value starts, so a value starting with one of them, or with ``=``, ``!`` or
``~`` (which would run into the operator), must be double-quoted.  A regexp
containing ``,`` or a space must be quoted too.  Single quotes are ordinary
characters.

Semantics: ``==`` needs the field present and equal; ``!=`` compares the
value, an absent field counting as ``""`` (so ``parent!=""`` selects
snapshots with a parent); ``~=`` is a regexp *search* and, like
containerd's, also runs against an absent field's ``""``.

Where we differ from containerd, on purpose
-------------------------------------------
* Whitespace is skipped between any two tokens.  containerd only skips it
  before a field, an operator or a value, so it rejects ``a==b ,c`` and a
  trailing space; every filter it accepts means the same here.
* An unquoted value may start with ``.`` (``name~=.*foo``); containerd's
  scanner takes that dot for a field separator and rejects the filter.
* Regexps run on RE2 (google-re2), the engine whose syntax Go's regexp
  implements, so ``~=`` means what it means in containerd, and matching takes
  linear time: a client cannot stall the daemon with a catastrophic pattern.
* A quoted string that is not valid UTF-8 once unescaped (``"\\xff"``), or a
  ``\\u`` escape naming a surrogate, is an error rather than a value no label
  can ever equal.
* Errors give the position as a character index, not a byte offset.
"""

from __future__ import annotations

import enum
import re
import string
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeAlias

import re2

from overlay.errors import InvalidArgumentError
from overlay.snapshots import Info, Kind

__all__ = [
    "ALWAYS",
    "Adaptor",
    "AllOf",
    "Always",
    "AnyOf",
    "Filter",
    "Operator",
    "Selector",
    "info_adaptor",
    "labels_field",
    "mapping_adaptor",
    "parse",
]

#: Given a field path, returns ``(value, present)``; an absent field is ``("", False)``.
Adaptor: TypeAlias = Callable[[Sequence[str]], tuple[str, bool]]

_ABSENT: Final = ("", False)


class Filter(Protocol):
    """Anything that can decide whether one object, seen through an adaptor, matches."""

    def match(self, adaptor: Adaptor) -> bool: ...


@dataclass(frozen=True, slots=True)
class Always:
    """The filter of an empty list or an empty string: everything matches."""

    def match(self, adaptor: Adaptor) -> bool:
        return True


ALWAYS: Final = Always()


@dataclass(frozen=True, slots=True)
class AnyOf:
    """A list of filter strings: the object matches if any of them does."""

    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return any(f.match(adaptor) for f in self.filters)


@dataclass(frozen=True, slots=True)
class AllOf:
    """One filter string of several comma-separated selectors: all must match."""

    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(f.match(adaptor) for f in self.filters)


class Operator(enum.Enum):
    """How a selector compares a field with its value."""

    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


_OPERATORS: Final = {op.value: op for op in Operator if op is not Operator.PRESENT}


@dataclass(frozen=True, slots=True)
class Selector:
    """One ``fieldpath [op value]`` term.

    ``pattern`` is the compiled ``value`` of a ``~=`` selector; it is
    compiled once, when the selector is built, so that matching thousands of
    snapshots never recompiles it (and a bad regexp fails the request, not
    every match).
    """

    fieldpath: tuple[str, ...]
    operator: Operator = Operator.PRESENT
    value: str = ""
    # made from value: two selectors are equal when their values are, whether
    # or not RE2's compile cache handed both the same object
    pattern: Regexp | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.fieldpath, tuple):
            object.__setattr__(self, "fieldpath", tuple(self.fieldpath))
        if not self.fieldpath:
            raise InvalidArgumentError("filter selector: the field path must not be empty")
        if self.operator is Operator.MATCHES and self.pattern is None:
            try:
                pattern = _compile(self.value)
            except _RegexpError as exc:
                raise InvalidArgumentError(f"filter selector: {exc.reason}") from exc.__cause__
            object.__setattr__(self, "pattern", pattern)

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if not present:
            value = ""
        op = self.operator
        if op is Operator.PRESENT:
            return present
        if op is Operator.EQUAL:
            return present and value == self.value
        if op is Operator.NOT_EQUAL:
            return value != self.value
        return self.pattern is not None and self.pattern.search(value) is not None


def parse(*filters: str) -> Filter:
    """Parse a request's filter strings into one filter (their OR).

    No strings, or any empty string, gives :data:`ALWAYS`; every string is
    still checked, so one bad filter fails the whole request.  Raises
    :class:`~overlay.errors.InvalidArgumentError` naming the filter, the
    position (a character index) and what was expected there.
    """
    parsed: list[Filter] = []
    for text in filters:
        if not isinstance(text, str):
            raise InvalidArgumentError(f"filter {text!r}: must be a string")
        parsed.append(_parse_one(text))
    if not parsed or any(isinstance(f, Always) for f in parsed):
        return ALWAYS
    if len(parsed) == 1:
        return parsed[0]
    return AnyOf(tuple(parsed))


def labels_field(labels: Mapping[str, str] | None, path: Sequence[str]) -> tuple[str, bool]:
    """Look up ``labels.<path>``: the label key is ``path`` re-joined with ``.``.

    ``path`` is the field path *after* ``labels``, so ``labels.a.b`` finds the
    label ``a.b`` (a label key with a dot need not be quoted).  Without labels
    there are no label fields at all, as in containerd.
    """
    if not labels or not path:
        return _ABSENT
    value = labels.get(".".join(path))
    if value is None:
        return _ABSENT
    return value, True


def mapping_adaptor(fields: Mapping[str, str], labels: Mapping[str, str] | None = None) -> Adaptor:
    """An adaptor over plain string fields plus an optional ``labels`` map.

    For stores whose objects are a few named strings and labels (content
    info, ingest statuses).  A field missing from ``fields`` is absent; a
    path with more than one element only exists under ``labels``.
    """

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return _ABSENT
        if path[0] == "labels":
            return labels_field(labels, path[1:])
        if len(path) != 1:
            return _ABSENT
        value = fields.get(path[0])
        if value is None:
            return _ABSENT
        return value, True

    return field


def info_adaptor(info: Info) -> Adaptor:
    """The snapshot adaptor: ``kind``, ``name``, ``parent`` and ``labels.<key>``.

    ``parent`` is always present (``""`` for none), so ``parent==""`` selects
    the snapshots without a parent.  A kind that is none of active, view or
    committed has no ``kind`` field, as in containerd.  Any other path,
    including ``name.x`` or a bare ``labels``, is absent.
    """

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return _ABSENT
        head = path[0]
        if head == "labels":
            return labels_field(info.labels, path[1:])
        if len(path) != 1:
            return _ABSENT
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "kind" and info.kind != Kind.UNKNOWN:
            return info.kind.filter_value, True
        return _ABSENT

    return field


# --- the parser -------------------------------------------------------------------

_QUOTES: Final = frozenset('"/|')
_OPERATOR_CHARS: Final = frozenset("=!~")
_FIELD_CHARS: Final = frozenset(string.ascii_letters + string.digits + "_-")
_OCTAL_DIGITS: Final = frozenset("01234567")
_HEX_DIGITS: Final = frozenset(string.hexdigits)
_SIMPLE_ESCAPES: Final = {
    "a": 0x07,
    "b": 0x08,
    "f": 0x0C,
    "n": 0x0A,
    "r": 0x0D,
    "t": 0x09,
    "v": 0x0B,
    "\\": 0x5C,
}
_HEX_ESCAPE_DIGITS: Final = {"x": 2, "u": 4, "U": 8}
# Go's unicode.IsSpace: these in Latin-1, the White_Space property above it.
_LATIN1_SPACES: Final = frozenset("\t\n\v\f\r \x85\xa0")
_FORBIDDEN: Final = re.compile("[\x00\ud800-\udfff]")


def _is_space(ch: str) -> bool:
    if ch <= "\xff":
        return ch in _LATIN1_SPACES
    return unicodedata.category(ch) in ("Zs", "Zl", "Zp")


def _is_value_char(ch: str) -> bool:
    # Go's scanner: letters, marks, numbers, punctuation and symbols, but not ",".
    if ch < "\x80":
        return "!" <= ch <= "~" and ch != ","
    return not _is_space(ch) and unicodedata.category(ch)[0] in "LMNPS"


class _RegexpError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Regexp(Protocol):
    """A compiled ``~=`` pattern (RE2)."""

    def search(self, text: str) -> object | None: ...


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is the client's error, not our log's


def _compile(value: str) -> Regexp:
    try:
        compiled: Regexp = re2.compile(value, _RE2_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(
            exc.args[0], bytes) else str(exc)
        raise _RegexpError(f"invalid regular expression {value!r}: {detail}") from exc
    return compiled


def _describe(text: str, pos: int, reason: str) -> str:
    rest = repr(text[pos:]) if pos < len(text) else "the end"
    return f"filter {text!r}: {reason} (at position {pos}: {text[:pos]!r} >>> {rest})"


def _found(ch: str) -> str:
    return repr(ch) if ch else "the end of the filter"


def _parse_one(text: str) -> Filter:
    if text == "":
        return ALWAYS
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        raise InvalidArgumentError(
            _describe(text, bad.start(), f"character {bad.group()!r} is not allowed")
        )
    return _Parser(text).parse()


class _Parser:
    """Recursive descent over one filter string; ``_pos`` is a character index."""

    __slots__ = ("_end", "_pos", "_text")

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._end = len(text)

    def parse(self) -> Filter:
        selectors = [self._selector()]
        while True:
            spaced = self._skip_space()
            ch = self._peek()
            if not ch:
                break
            if ch != ",":
                hint = "; double-quote a value that contains spaces" if spaced else ""
                raise self._error(
                    self._pos, f"expected ',' or the end of the filter, found {ch!r}{hint}"
                )
            self._pos += 1
            selectors.append(self._selector())
        if len(selectors) == 1:
            return selectors[0]
        return AllOf(tuple(selectors))

    def _error(self, pos: int, reason: str) -> InvalidArgumentError:
        return InvalidArgumentError(_describe(self._text, pos, reason))

    def _peek(self) -> str:
        return self._text[self._pos] if self._pos < self._end else ""

    def _skip_space(self) -> bool:
        start = self._pos
        while self._pos < self._end and _is_space(self._text[self._pos]):
            self._pos += 1
        return self._pos != start

    def _selector(self) -> Selector:
        path = [self._field()]
        while True:
            self._skip_space()
            if self._peek() != ".":
                break
            self._pos += 1
            path.append(self._field())
        fieldpath = tuple(path)
        if self._peek() in ("", ","):
            return Selector(fieldpath)
        op = self._operator(fieldpath)
        self._skip_space()
        value_pos = self._pos
        value = self._value(op)
        if op is not Operator.MATCHES:
            return Selector(fieldpath, op, value)
        try:
            pattern = _compile(value)
        except _RegexpError as exc:
            raise self._error(value_pos, exc.reason) from exc.__cause__
        return Selector(fieldpath, op, value, pattern)

    def _field(self) -> str:
        self._skip_space()
        start = self._pos
        ch = self._peek()
        if ch in _QUOTES:
            value, quote = self._quoted()
            if quote != '"':
                raise self._error(
                    start, f"a field can only be quoted with double quotes, not {quote!r}"
                )
            return value
        end = start
        while end < self._end and self._text[end] in _FIELD_CHARS:
            end += 1
        if end == start:
            raise self._error(
                start, f"expected a field name or a double-quoted string, found {_found(ch)}"
            )
        self._pos = end
        return self._text[start:end]

    def _operator(self, fieldpath: tuple[str, ...]) -> Operator:
        start = end = self._pos
        while end < self._end and self._text[end] in _OPERATOR_CHARS:
            end += 1
        token = self._text[start:end]
        if not token:
            hint = ""
            if start > 0 and self._text[start - 1] in _FIELD_CHARS:
                hint = (
                    "; double-quote a field that contains characters other than letters,"
                    ' digits, "_" and "-", as in labels."example.com/key"'
                )
            path = ".".join(fieldpath)
            raise self._error(
                start,
                "expected an operator (==, != or ~=), ',' or the end of the filter"
                f" after {path!r}, found {self._peek()!r}{hint}",
            )
        op = _OPERATORS.get(token)
        if op is None:
            if token == "=":
                reason = "unsupported operator '=', use '=='"
            elif token[:2] in _OPERATORS:
                reason = (
                    f"unsupported operator {token!r}; double-quote a value that starts"
                    " with '=', '!' or '~'"
                )
            else:
                reason = f"unsupported operator {token!r}, use ==, != or ~="
            raise self._error(start, reason)
        self._pos = end
        return op

    def _value(self, op: Operator) -> str:
        start = self._pos
        ch = self._peek()
        if ch in _QUOTES:
            if ch != '"' and op is not Operator.MATCHES:
                raise self._error(
                    start,
                    f"a value starting with {ch!r} must be double-quoted after {op.value!r}"
                    " ('/' and '|' quote regular expressions after '~=')",
                )
            value, _ = self._quoted()
            return value
        if not ch or ch == ",":
            raise self._error(
                start,
                f"expected a value after {op.value!r}, found {_found(ch)}"
                '; write "" for an empty value',
            )
        if ch in _OPERATOR_CHARS:
            raise self._error(start, f"a value starting with {ch!r} must be double-quoted")
        end = start
        while end < self._end and _is_value_char(self._text[end]):
            end += 1
        if end == start:
            raise self._error(
                start,
                f"character {ch!r} cannot appear in an unquoted value;"
                " double-quote the value and write it as an escape",
            )
        self._pos = end
        return self._text[start:end]

    def _quoted(self) -> tuple[str, str]:
        text = self._text
        start = self._pos
        quote = text[start]
        out = bytearray()
        i = start + 1
        while True:
            if i >= self._end:
                raise self._error(start, f"quoted string not terminated, no closing {quote!r}")
            ch = text[i]
            if ch == quote:
                break
            if ch == "\n":
                raise self._error(
                    start, "quoted string not terminated before a newline (write \\n)"
                )
            if ch == "\\":
                i = self._escape(i, quote, out)
            else:
                out += ch.encode()
                i += 1
        self._pos = i + 1
        try:
            return out.decode(), quote
        except UnicodeDecodeError:
            raise self._error(
                start,
                "quoted string is not valid UTF-8 once unescaped (\\x and octal escapes"
                " are single bytes; use \\u for a character)",
            ) from None

    def _escape(self, i: int, quote: str, out: bytearray) -> int:
        """Decode the escape whose backslash is at ``i`` into ``out``; return the next index."""
        text = self._text
        c = text[i + 1] if i + 1 < self._end else ""
        if c in ("", "\n"):
            return i + 1  # the caller reports the unterminated string
        simple = _SIMPLE_ESCAPES.get(c)
        if simple is not None:
            out.append(simple)
            return i + 2
        if c == quote:
            out += c.encode()
            return i + 2
        if c in _OCTAL_DIGITS:
            digits = text[i + 1 : i + 4]
            if len(digits) < 3 or not _OCTAL_DIGITS.issuperset(digits):
                raise self._error(i, "an octal escape takes exactly three digits, \\000 to \\377")
            byte = int(digits, 8)
            if byte > 0o377:
                raise self._error(i, f"octal escape \\{digits} is greater than \\377")
            out.append(byte)
            return i + 4
        width = _HEX_ESCAPE_DIGITS.get(c)
        if width is not None:
            digits = text[i + 2 : i + 2 + width]
            if len(digits) < width or not _HEX_DIGITS.issuperset(digits):
                raise self._error(i, f"a \\{c} escape takes exactly {width} hex digits")
            code = int(digits, 16)
            if c == "x":
                out.append(code)
            elif code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise self._error(i, f"\\{c}{digits} is not a valid Unicode code point")
            else:
                out += chr(code).encode()
            return i + 2 + width
        if quote in "/|":
            hint = (
                "; write \\\\ for a backslash in the regular expression, or leave the"
                " regular expression unquoted"
            )
        elif c in _QUOTES or c == "'":
            hint = f"; only {quote!r} can be escaped inside {quote}…{quote}"
        else:
            hint = ""
        shown = repr("\\" + c)
        raise self._error(i, f"invalid escape sequence {shown} in a quoted string{hint}")
