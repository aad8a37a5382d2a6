"""Fuzzing containerd's filter grammar (``overlay.filters``) with hypothesis.

Filter strings come from clients (``List``'s ``filters``).  The properties:

* any string parses or raises ``InvalidArgumentError``, nothing else, and a
  parsed filter matches any object without raising;
* a filter printed from a random syntax tree (every field and value, any
  characters at all, quoted or bare where the grammar allows, escapes of
  every kind, whitespace of every kind between tokens) parses back to that
  tree, and matches exactly as a direct evaluation of the tree says (the
  reference: the semantics in the module's docstring, with ``~=`` on escaped
  literals so that a substring test is its meaning).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hypothesis import example, given
from hypothesis import strategies as st

from overlay.errors import InvalidArgumentError
from overlay.filters import ALWAYS, Adaptor, AllOf, AnyOf, Filter, Operator, Selector, parse
from tests.fuzz._settings import examples

ALPHABET = list("ab_-9.\"/|\\=!~, \t\n'xu0U\x00\x85牛*[]()+?{}$^\u3000\u2028\ud800")


@examples(3000)
@given(st.text(alphabet=st.sampled_from(ALPHABET), max_size=30) | st.text(max_size=30),
       st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
@example('a=="\\xff"', {})
@example('a~="\\8"', {})
@example("a~=\\", {})
def test_any_string_parses_or_is_invalid_argument(text: str, fields: dict[str, str]) -> None:
    try:
        flt = parse(text)
    except InvalidArgumentError as exc:
        assert str(exc)
        return
    adaptor = dict_adaptor(fields)
    assert flt.match(adaptor) in (True, False)
    assert flt.match(lambda path: ("", False)) in (True, False)


# --- a syntax tree, printed -------------------------------------------------------------


@dataclass(frozen=True)
class Sel:
    path: tuple[str, ...]
    op: Operator
    value: str = ""


FIELD_CHARS = re.compile(r"[A-Za-z0-9_-]+")
SPACES = ["", "", "", " ", "\t", "  ", "\u3000", "\x85", "\n"]
names = st.text(max_size=8)
# ~= values stay literals (escaped for RE2) so that matching means "contains"
literals = st.text(max_size=6)


def go_quote(draw: st.DrawFn, text: str) -> str:
    """``text`` as a Go double-quoted string, each character escaped one random way."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        forms = []
        if ch not in '"\\\n\x00':
            forms.append(ch)
        if code < 0x80:
            forms += [f"\\x{code:02x}", f"\\{code:03o}"]
        forms += [f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}", f"\\U{code:08x}"]
        if ch == '"':
            forms.append('\\"')
        simple = {"\n": "\\n", "\t": "\\t", "\\": "\\\\", "\a": "\\a", "\b": "\\b",
                  "\f": "\\f", "\r": "\\r", "\v": "\\v"}
        if ch in simple:
            forms.append(simple[ch])
        out.append(draw(st.sampled_from(forms)))
    out.append('"')
    return "".join(out)


def bare_value_ok(value: str) -> bool:
    return bool(value) and value[0] not in '"/|=!~' and all(
        ("!" <= c <= "~" and c != ",") for c in value)


@st.composite
def selectors(draw: st.DrawFn) -> Sel:
    path = tuple(draw(st.lists(names, min_size=1, max_size=3)))
    op = draw(st.sampled_from(list(Operator)))
    if op is Operator.PRESENT:
        return Sel(path, op)
    if op is Operator.MATCHES:
        return Sel(path, op, re.escape(draw(literals)))
    return Sel(path, op, draw(st.text(max_size=8)))


def render(draw: st.DrawFn, sel: Sel) -> str:
    def sp() -> str:
        return draw(st.sampled_from(SPACES))

    fields = []
    for name in sel.path:
        if FIELD_CHARS.fullmatch(name) and draw(st.booleans()):
            fields.append(name)
        else:
            fields.append(go_quote(draw, name))
    text = sp() + (sp() + "." + sp()).join(fields)
    if sel.op is Operator.PRESENT:
        return text + sp()
    value = sel.value
    if bare_value_ok(value) and draw(st.booleans()):
        shown = value
    elif sel.op is Operator.MATCHES and not set(value) & set("/\\\n\x00") \
            and draw(st.booleans()):
        shown = "/" + value + "/"
    else:
        shown = go_quote(draw, value)
    return text + sp() + str(sel.op.value) + sp() + shown + sp()


@st.composite
def filters(draw: st.DrawFn) -> tuple[list[list[Sel]], list[str]]:
    tree = draw(st.lists(st.lists(selectors(), min_size=1, max_size=3), min_size=1,
                         max_size=3))
    return tree, [",".join(render(draw, s) for s in conj) for conj in tree]


def flatten(flt: Filter) -> list[list[Sel]]:
    if isinstance(flt, AnyOf):
        return [conj for f in flt.filters for conj in flatten(f)]
    if isinstance(flt, AllOf):
        return [[s for f in flt.filters for s in flatten(f)[0]]]
    assert isinstance(flt, Selector), flt
    return [[Sel(flt.fieldpath, flt.operator, flt.value)]]


def dict_adaptor(fields: Mapping[str, str]) -> Adaptor:
    def field(path: Sequence[str]) -> tuple[str, bool]:
        key = ".".join(path)
        return (fields[key], True) if key in fields else ("", False)
    return field


def reference(tree: list[list[Sel]], fields: Mapping[str, str]) -> bool:
    def one(sel: Sel) -> bool:
        key = ".".join(sel.path)
        present = key in fields
        value = fields.get(key, "")
        if sel.op is Operator.PRESENT:
            return present
        if sel.op is Operator.EQUAL:
            return present and value == sel.value
        if sel.op is Operator.NOT_EQUAL:
            return value != sel.value
        return re.sub(r"\\(.)", r"\1", sel.value, flags=re.S) in value
    return any(all(one(s) for s in conj) for conj in tree)


@examples(1000)
@given(filters(), st.data())
def test_printed_trees_parse_back_and_match_as_the_reference(
        printed: tuple[list[list[Sel]], list[str]], data: st.DataObject) -> None:
    tree, texts = printed
    flt = parse(*texts)
    assert flt is not ALWAYS
    assert flatten(flt) == tree
    # objects whose fields are the tree's own paths and values, or near them
    keys = [".".join(s.path) for conj in tree for s in conj]
    values = [v for conj in tree for s in conj
              for v in (s.value, re.sub(r"\\(.)", r"\1", s.value, flags=re.S))]
    for _ in range(2):
        fields = data.draw(st.dictionaries(
            st.sampled_from(keys) | st.text(max_size=3),
            st.sampled_from(values) | st.text(max_size=4)
            | st.sampled_from(values).map(lambda v: "x" + v + "y"), max_size=4))
        assert flt.match(dict_adaptor(fields)) == reference(tree, fields), fields
