"""The filter language (SPEC §1.5), against fixed corpora with exact expected matches.

The first tables port containerd's own filter and scanner cases; the snapshot
tables pin the adaptor and the filters the rest of the stack relies on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from overlay import filters
from overlay.errors import InvalidArgumentError
from overlay.filters import (
    ALWAYS,
    Adaptor,
    AllOf,
    AnyOf,
    Operator,
    Selector,
    info_adaptor,
    labels_field,
    mapping_adaptor,
    parse,
)
from overlay.snapshots import Info, Kind

# --- containerd's filter_test.go corpus ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    other: str = ""
    labels: Mapping[str, str] | None = None


CORPUS: tuple[Entry, ...] = (
    Entry("foo", labels={"foo": "true"}),
    Entry("bar"),
    Entry("foo", labels={"foo": "present", "more complex label": "present"}),
    Entry("bar", labels={"bar": "true"}),
    Entry("fooer", labels={'more complex label with \\ and "': "present"}),
    Entry("fooer", labels={'more complex label with \\ and ".post': "present"}),
    Entry("baz", other="too complex, yo"),
    Entry("bazo", other="abc"),
    Entry("compound", labels={"foo": "omg_asdf.asdf-qwer"}),
)
ALL = tuple(range(len(CORPUS)))


def entry_adaptor(entry: Entry) -> Adaptor:
    """containerd's test adaptor: name and other exist when non-empty."""

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if path[0] == "name":
            return entry.name, bool(entry.name)
        if path[0] == "other":
            return entry.other, bool(entry.other)
        if path[0] == "labels":
            return labels_field(entry.labels, path[1:])
        return "", False

    return field


def corpus_matches(text: str) -> tuple[int, ...]:
    flt = parse(text)
    return tuple(i for i, entry in enumerate(CORPUS) if flt.match(entry_adaptor(entry)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", ALL, id="Empty"),
        pytest.param("name", ALL, id="Present"),
        pytest.param("labels.foo", (0, 2, 8), id="LabelPresent"),
        pytest.param("labels.foo,name", (0, 2, 8), id="NameAndLabelPresent"),
        pytest.param("labels.foo==true", (0,), id="LabelValue"),
        pytest.param("labels.foo==omg_asdf.asdf-qwer", (8,), id="LabelValuePunctuated"),
        pytest.param("name==bar", (1, 3), id="Name"),
        pytest.param("name!=bar", (0, 2, 4, 5, 6, 7, 8), id="NameNotEqual"),
        pytest.param("name==bar,labels.bar", (3,), id="NameAndLabelPresent2"),
        pytest.param('other=="too complex, yo"', (6,), id="QuotedValue"),
        pytest.param("other~=[abc]+,name!=foo", (6, 7), id="RegexpValue"),
        pytest.param("other~=/[abc]+/,name!=foo", (6, 7), id="RegexpQuotedValue"),
        pytest.param("other~=/[abc]{1,2}/,name!=foo", (6, 7), id="RegexpQuotedValueBraces"),
        pytest.param('other~=/[abc]{0,1}"\\//,name!=foo', (), id="RegexpQuotedValueGarbage"),
        pytest.param("name==bar,labels.bar==true", (3,), id="NameAndLabelValue"),
        pytest.param("name==bar,labels.bar==wrong", (), id="NameAndLabelValueNoMatch"),
        pytest.param('name==foo,labels."more complex label"', (2,), id="LabelQuotedFieldPath"),
        pytest.param(
            'labels."more complex label with \\\\ and \\""==present',
            (4,),
            id="LabelQuotedFieldPathPresentWithQuoted",
        ),
        pytest.param(
            'labels."more complex label with \\\\ and \\"".post==present',
            (5,),
            id="LabelQuotedFieldPathPresentWithQuotedEmbed",
        ),
        # ours: the same corpus, other corners
        pytest.param("other", (6, 7), id="OtherPresent"),
        pytest.param("other!=abc", (0, 1, 2, 3, 4, 5, 6, 8), id="NotEqualAbsentIsEmpty"),
        pytest.param('other==""', (), id="EqualNeedsPresence"),
        pytest.param("other~=^$", (0, 1, 2, 3, 4, 5, 8), id="RegexpSeesAbsentAsEmpty"),
        pytest.param("name~=^foo", (0, 2, 4, 5), id="RegexpIsSearchAnchored"),
        pytest.param("name~=oo", (0, 2, 4, 5), id="RegexpIsSearch"),
        pytest.param("name~=|^ba.$|", (1, 3, 6), id="RegexpPipeQuoted"),
        pytest.param('name~="^ba.\\\\b"', (1, 3, 6), id="RegexpDoubleQuotedBackslash"),
        pytest.param("name~=^ba.\\b", (1, 3, 6), id="RegexpUnquotedRawBackslash"),
        pytest.param("labels.foo~=p.*", (2,), id="RegexpOnLabel"),
        pytest.param("missing", (), id="UnknownFieldAbsent"),
        pytest.param("missing!=x", ALL, id="UnknownFieldNotEqual"),
        pytest.param('labels."more complex label".x', (), id="QuotedThenPlainNoSuchLabel"),
        pytest.param(" name == bar , labels.bar ", (3,), id="WhitespaceBetweenTokens"),
        pytest.param("labels . foo", (0, 2, 8), id="WhitespaceAroundDot"),
        pytest.param("name==bar,name==bar,labels.bar", (3,), id="RepeatedSelectors"),
    ],
)
def test_containerd_corpus(text: str, expected: tuple[int, ...]) -> None:
    assert corpus_matches(text) == expected


# --- parse trees: what the scanner and unquoting produce ---------------------------


def sel(path: str, op: Operator = Operator.PRESENT, value: str = "") -> Selector:
    return Selector(tuple(path.split("/")), op, value)


EQ, NE, RE = Operator.EQUAL, Operator.NOT_EQUAL, Operator.MATCHES


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name", sel("name")),
        ("name==value,foo!=bar", AllOf((sel("name", EQ, "value"), sel("foo", NE, "bar")))),
        (
            "name==value,labels.foo==value,other.bar~=match",
            AllOf(
                (
                    sel("name", EQ, "value"),
                    sel("labels/foo", EQ, "value"),
                    sel("other/bar", RE, "match"),
                )
            ),
        ),
        ("name~=[abc]+,foo==test", AllOf((sel("name", RE, "[abc]+"), sel("foo", EQ, "test")))),
        ("name~=[abc]\\+", sel("name", RE, "[abc]\\+")),
        (
            "name~=/[abc]{0,2}/,foo==test",
            AllOf((sel("name", RE, "[abc]{0,2}"), sel("foo", EQ, "test"))),
        ),
        (
            "name~=牛,labels.moo==true",
            AllOf((sel("name", RE, "牛"), sel("labels/moo", EQ, "true"))),
        ),
        ("name~=|牛|", sel("name", RE, "牛")),
        ('name~="asdf\\n\\tfooo"', sel("name", RE, "asdf\n\tfooo")),
        ("foo == bar    ", sel("foo", EQ, "bar")),
        (
            "compound.labels==punctuated_value.foo-bar",
            sel("compound/labels", EQ, "punctuated_value.foo-bar"),
        ),
        ('"leading quote".postquote==value', sel("leading quote/postquote", EQ, "value")),
        ("input~=/foo\\/bar/,id!=ff", AllOf((sel("input", RE, "foo/bar"), sel("id", NE, "ff")))),
        ("input~=|foo/bar|,id!=ff", AllOf((sel("input", RE, "foo/bar"), sel("id", NE, "ff")))),
        ("input~=|a\\|b|", sel("input", RE, "a|b")),
        # the snapshot examples from SPEC §1.5
        (
            'labels."containerd.io/gc.root"==check-walk',
            Selector(("labels", "containerd.io/gc.root"), EQ, "check-walk"),
        ),
        ('parent!=""', sel("parent", NE, "")),
        (
            'labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/3/sha256:def"',
            AllOf(
                (
                    Selector(("labels", "containerd.io/snapshot.ref"), EQ, "sha256:abc"),
                    sel("parent", EQ, "ns/3/sha256:def"),
                )
            ),
        ),
        # fields: letters, digits, "_" and "-" (containerd's scanner), any start
        ("my-label_2.0x", sel("my-label_2/0x")),
        ('"".x', Selector(("", "x"))),
        # values: printable runs; "=", "!", "~", quotes and dots inside are fine
        ("a==b==c", sel("a", EQ, "b==c")),
        ("a==x.y~z!w", sel("a", EQ, "x.y~z!w")),
        ('a==x"y"', sel("a", EQ, 'x"y"')),
        ("a=='x'", sel("a", EQ, "'x'")),
        ("a==-1", sel("a", EQ, "-1")),
        ("a==.x", sel("a", EQ, ".x")),
        ("a~=.*x$", sel("a", RE, ".*x$")),
        ("a==sha256:abc", sel("a", EQ, "sha256:abc")),
        ("a==caf\u00e9\u0301", sel("a", EQ, "caf\u00e9\u0301")),
        ('a==""', sel("a", EQ, "")),
        ('a==".x"', sel("a", EQ, ".x")),
        ('a=="/x"', sel("a", EQ, "/x")),
        ('a=="|x|"', sel("a", EQ, "|x|")),
        ('a=="a, b"', sel("a", EQ, "a, b")),
        ('a=="tab\there"', sel("a", EQ, "tab\there")),
        # Go escapes
        ('a=="\\a\\b\\f\\n\\r\\t\\v\\\\\\""', sel("a", EQ, '\a\b\f\n\r\t\v\\"')),
        ('a=="\\101\\x42\\u0043\\U00000044"', sel("a", EQ, "ABCD")),
        ('a=="\\xc3\\xa9"', sel("a", EQ, "\u00e9")),
        ('a=="\\303\\251"', sel("a", EQ, "\u00e9")),
        ('a=="\\u725b\\U0001F42E"', sel("a", EQ, "牛\U0001f42e")),
        ('a=="\\000"', sel("a", EQ, "\x00")),
        ("a~=/\"'/", sel("a", RE, "\"'")),
        ("a~=|/|", sel("a", RE, "/")),
    ],
)
def test_parse_tree(text: str, expected: object) -> None:
    assert parse(text) == expected


def test_regexp_compiled_at_parse_time() -> None:
    flt = parse("name~=^a+$")
    assert isinstance(flt, Selector)
    assert flt.pattern is not None
    assert flt.pattern.search("aaa") is not None
    assert flt.pattern.search("ab") is None


def test_regexps_are_go_syntax() -> None:
    # RE2 = Go's regexp: Unicode classes and POSIX classes work, "$" is the end
    assert parse("name~=^\\pL+$").match(lambda path: ("héllo", True))
    assert parse("name~=^[[:alpha:]]+$").match(lambda path: ("abc", True))
    assert not parse("name~=^a$").match(lambda path: ("a\n", True))


def test_catastrophic_patterns_take_linear_time() -> None:
    flt = parse("name~=^(a+)+$")
    assert not flt.match(lambda path: ("a" * 5000 + "b", True))


def test_selector_built_by_hand_compiles_its_pattern() -> None:
    s = Selector(("name",), Operator.MATCHES, "^ab")
    assert s.pattern is not None
    assert s.match(lambda path: ("abc", True))
    assert not s.match(lambda path: ("cab", True))
    with pytest.raises(InvalidArgumentError):
        Selector(("name",), Operator.MATCHES, "(")
    with pytest.raises(InvalidArgumentError):
        Selector(())


def test_list_is_or_and_empty_is_everything() -> None:
    assert parse() is ALWAYS
    assert parse("") is ALWAYS
    assert parse("name==a", "") is ALWAYS
    assert parse("name==a", "name==b") == AnyOf((sel("name", EQ, "a"), sel("name", EQ, "b")))


def test_every_filter_is_checked_even_with_an_empty_one() -> None:
    with pytest.raises(InvalidArgumentError, match="'name=='"):
        parse("", "name==")


def test_non_string_filter_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError):
        parse(["name==a"])  # type: ignore[arg-type]


# --- failures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "reason"),
    [
        # containerd's failing cases
        ("labels.|foo|==omg_asdf.asdf-qwer", 7, "a field can only be quoted with double quotes"),
        (
            'labels.?"more complex label with \\\\ and \\"".post==present',
            7,
            "expected a field name",
        ),
        ("name==foo,", 10, "expected a field name"),
        ("labels.", 7, "expected a field name"),
        ("image~=,id?=?fbaq", 7, "expected a value after '~='"),
        ("labels.ns/key==value", 9, "double-quote a field that contains characters other than"),
        ("labels.key==/value", 12, "must be double-quoted after '=='"),
        ("interrupted==", 13, "expected a value after '=='"),
        ("doublevalue==value value", 19, "double-quote a value that contains spaces"),
        ("input==,id!=ff", 7, "expected a value after '=='"),
        ("foo\x00bar", 3, "is not allowed"),
        # operators: only ==, != and ~= (no "=", "!~=", "!==" nor "*" wildcards)
        ("a=b", 1, "unsupported operator '=', use '=='"),
        ("labels.foo!~=p.*", 10, "unsupported operator '!~='"),
        ("a!==b", 1, "unsupported operator '!=='"),
        ("a===b", 1, "double-quote a value that starts with '=', '!' or '~'"),
        ("a==!b", 1, "unsupported operator '==!'"),
        ("a~b", 1, "unsupported operator '~'"),
        ("labels.*", 7, "expected a field name"),
        ("name foo", 5, "expected an operator"),
        ('name"x"', 4, "expected an operator"),
        # unterminated quotes, also where a token merely starts with / or |
        ('labels."abc', 7, "quoted string not terminated"),
        ('a=="abc', 3, "quoted string not terminated"),
        ("a~=/abc", 3, "quoted string not terminated"),
        ("a~=|abc", 3, "quoted string not terminated"),
        ('a=="ab\ncd"', 3, "not terminated before a newline"),
        ('a=="abc\\', 3, "quoted string not terminated"),
        ('a=="abc\\"', 3, "quoted string not terminated"),
        # bad escapes
        ('a=="\\q"', 4, "invalid escape sequence '\\\\q'"),
        ('a=="\\\'"', 4, "only '\"' can be escaped"),
        ('a=="\\/"', 4, "invalid escape sequence"),
        ('a~=/\\"/', 4, "invalid escape sequence"),
        ("a~=/\\d+/", 4, "write \\\\ for a backslash"),
        ('a=="\\8"', 4, "invalid escape sequence"),
        ('a=="\\12"', 4, "three digits"),
        ('a=="\\400"', 4, "greater than \\377"),
        ('a=="\\x4"', 4, "exactly 2 hex digits"),
        ('a=="\\xzz"', 4, "exactly 2 hex digits"),
        ('a=="\\u12"', 4, "exactly 4 hex digits"),
        ('a=="\\U0000004"', 4, "exactly 8 hex digits"),
        ('a=="\\U00110000"', 4, "not a valid Unicode code point"),
        ('a=="\\ud800"', 4, "not a valid Unicode code point"),
        ('a=="\\xff"', 3, "not valid UTF-8"),
        # missing or malformed values
        ("a==", 3, "expected a value after '=='"),
        ("a!=,b", 3, "expected a value after '!='"),
        ("a== =x", 4, "a value starting with '=' must be double-quoted"),
        ("a==|x|", 3, "a value starting with '|' must be double-quoted"),
        ("a!=/x/", 3, "a value starting with '/' must be double-quoted"),
        ("a==\x01", 3, "cannot appear in an unquoted value"),
        # stray characters and structure
        (",", 0, "expected a field name"),
        ("   ", 3, "expected a field name"),
        ("a,,b", 2, "expected a field name"),
        (".a", 0, "expected a field name"),
        ("a..b", 2, "expected a field name"),
        ("'a'==b", 0, "expected a field name"),
        ('a=="b"c', 6, "expected ',' or the end of the filter, found 'c'"),
        ('a=="b".c', 6, "expected ',' or the end of the filter"),
        ("a@b", 1, "expected an operator"),
        # bad regular expressions
        ("name~=[", 6, "invalid regular expression '['"),
        ("name~=(a", 6, "missing )"),
        ("name~=/a{2,1}/", 6, "invalid repetition size"),
        ("name~=a{2,1}", 11, "expected an operator"),  # the comma ends the selector
        ("name~=/*/", 6, "no argument for repetition operator"),
        ("name~=a{1001}", 6, "invalid repetition size"),
        ("name~=[[:bogus:]]", 6, "invalid character class range"),
        ("name~=(?=x)", 6, "invalid perl operator"),  # RE2, like Go: no look-around
    ],
)
def test_invalid(text: str, position: int, reason: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith(f"filter {text!r}: ")
    assert reason in message
    assert f"(at position {position}: {text[:position]!r} >>> " in message
    assert message.endswith(": invalid argument")
    assert info.value.grpc_code == "INVALID_ARGUMENT"


def test_error_at_the_end_says_so() -> None:
    with pytest.raises(
        InvalidArgumentError, match=re.escape("(at position 5: 'name,' >>> the end)")
    ):
        parse("name,")


def test_one_bad_filter_in_a_list_fails_the_list() -> None:
    with pytest.raises(InvalidArgumentError, match="'name~=\\('"):
        parse("name==a", "name~=(")


def test_parser_never_fails_otherwise() -> None:
    """Random strings over the grammar's alphabet parse or raise InvalidArgumentError."""
    rng = random.Random(20240614)
    alphabet = list("ab_-9.\"/|\\=!~, \t\n'xu0U\x00牛*[]()+?{}$^")
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        try:
            flt = parse(text)
        except InvalidArgumentError:
            continue
        flt.match(lambda path: ("", False))
        flt.match(lambda path: ("ab", True))


# --- the snapshot adaptor ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snap:
    kind: Kind
    name: str
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def info(self) -> Info:
        return Info(kind=self.kind, name=self.name, parent=self.parent, labels=self.labels)


SNAPSHOTS: tuple[Info, ...] = tuple(
    s.info()
    for s in (
        Snap(Kind.COMMITTED, "p"),
        Snap(Kind.ACTIVE, "a", "p", {"l": "1"}),
        Snap(Kind.VIEW, "v", "p", {"l": ""}),
        Snap(Kind.VIEW, "v2"),
        Snap(Kind.COMMITTED, "c", "p", {"containerd.io/gc.root": "check-walk"}),
        Snap(Kind.COMMITTED, "ns/3/sha256:def", "", {"containerd.io/snapshot.ref": "sha256:abc"}),
        Snap(
            Kind.ACTIVE,
            "ns/4/extract-1 sha256:abc",
            "ns/3/sha256:def",
            {"containerd.io/snapshot.ref": "sha256:abc", "a.b.c": "x"},
        ),
        Snap(
            Kind.ACTIVE, "ns/5/x", "ns/3/sha256:def", {"containerd.io/snapshot.ref": "sha256:zzz"}
        ),
        Snap(Kind.UNKNOWN, "u", "c"),
    )
)
SNAPSHOT_NAMES = tuple(s.name for s in SNAPSHOTS)


def walk(*texts: str) -> tuple[str, ...]:
    flt = parse(*texts)
    return tuple(s.name for s in SNAPSHOTS if flt.match(info_adaptor(s)))


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        # the filters containerd and its tests send
        (('labels."containerd.io/gc.root"==check-walk',), ("c",)),
        (("kind==view,labels.l",), ("v",)),
        (("name==p",), ("p",)),
        (
            ('parent!=""',),
            ("a", "v", "c", "ns/4/extract-1 sha256:abc", "ns/5/x", "u"),
        ),
        (
            ('labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/3/sha256:def"',),
            ("ns/4/extract-1 sha256:abc",),
        ),
        # kind
        (("kind==active",), ("a", "ns/4/extract-1 sha256:abc", "ns/5/x")),
        (("kind==committed",), ("p", "c", "ns/3/sha256:def")),
        (("kind==view",), ("v", "v2")),
        (("kind==View",), ()),
        (("kind",), tuple(n for n in SNAPSHOT_NAMES if n != "u")),
        (("kind!=committed",), ("a", "v", "v2", "ns/4/extract-1 sha256:abc", "ns/5/x", "u")),
        # name and parent are always present
        (("name",), SNAPSHOT_NAMES),
        (("parent",), SNAPSHOT_NAMES),
        (('parent==""',), ("p", "v2", "ns/3/sha256:def")),
        (("parent==p",), ("a", "v", "c")),
        (('name=="ns/4/extract-1 sha256:abc"',), ("ns/4/extract-1 sha256:abc",)),
        # labels
        (("labels.l",), ("a", "v")),
        (('labels.l==""',), ("v",)),
        (('labels.l!=""',), ("a",)),
        (("labels.l!=1",), tuple(n for n in SNAPSHOT_NAMES if n != "a")),
        (("labels.a.b.c==x",), ("ns/4/extract-1 sha256:abc",)),
        (('labels."a.b.c"==x',), ("ns/4/extract-1 sha256:abc",)),
        (('labels."a".b."c"',), ("ns/4/extract-1 sha256:abc",)),
        (("labels.a.b",), ()),
        (("labels",), ()),
        # unknown fields are absent
        (("size",), ()),
        (("name.x",), ()),
        (("kind.active",), ()),
        (("size!=1",), SNAPSHOT_NAMES),
        # regexps: a search, on the value, "" when absent
        (("name~=^ns/",), ("ns/3/sha256:def", "ns/4/extract-1 sha256:abc", "ns/5/x")),
        (("name~=|sha256:[a-f]+$|",), ("ns/3/sha256:def", "ns/4/extract-1 sha256:abc")),
        (("name~=/^ns\\/[0-9]\\/x$/",), ("ns/5/x",)),
        (('name~="^ns/\\\\d/x$"',), ("ns/5/x",)),
        (("name~=^ns/\\d/x$",), ("ns/5/x",)),
        (
            ('labels."containerd.io/snapshot.ref"~=abc$',),
            ("ns/3/sha256:def", "ns/4/extract-1 sha256:abc"),
        ),
        (("labels.l~=^$",), tuple(n for n in SNAPSHOT_NAMES if n != "a")),
        (("kind~=^(view|active)$,parent~=.",), ("a", "v", "ns/4/extract-1 sha256:abc", "ns/5/x")),
        # lists are OR
        (("name==p", "kind==view"), ("p", "v", "v2")),
        (("name==p", "name==p"), ("p",)),
        (("name==nope", "labels.l==1"), ("a",)),
        (("name==p", ""), SNAPSHOT_NAMES),
        ((), SNAPSHOT_NAMES),
        (("",), SNAPSHOT_NAMES),
    ],
)
def test_walk_filters(texts: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert walk(*texts) == expected


def test_info_adaptor_fields() -> None:
    info = Info(Kind.ACTIVE, "k", "p", {"x.y": "1"})
    field = info_adaptor(info)
    assert field(["kind"]) == ("active", True)
    assert field(["name"]) == ("k", True)
    assert field(["parent"]) == ("p", True)
    assert field(["labels", "x", "y"]) == ("1", True)
    assert field(["labels", "x.y"]) == ("1", True)
    assert field(["labels", "x"]) == ("", False)
    assert field(["labels"]) == ("", False)
    assert field([]) == ("", False)
    assert field(["created"]) == ("", False)
    assert info_adaptor(Info(Kind.VIEW, "v"))(["kind"]) == ("view", True)
    assert info_adaptor(Info(Kind.COMMITTED, "c"))(["kind"]) == ("committed", True)
    assert info_adaptor(Info(Kind.UNKNOWN, "u"))(["kind"]) == ("", False)
    assert info_adaptor(Info(Kind.VIEW, "v"))(["parent"]) == ("", True)


def test_labels_field() -> None:
    assert labels_field(None, ["a"]) == ("", False)
    assert labels_field({}, ["a"]) == ("", False)
    assert labels_field({"a": ""}, ["a"]) == ("", True)
    assert labels_field({"a.b": "v"}, ("a", "b")) == ("v", True)
    assert labels_field({"": "v"}, ()) == ("", False)


def test_mapping_adaptor() -> None:
    field = mapping_adaptor({"digest": "sha256:1", "ref": ""}, {"k": "v"})
    flt = parse("digest~=^sha256:,labels.k==v,ref")
    assert flt.match(field)
    assert field(["digest"]) == ("sha256:1", True)
    assert field(["ref"]) == ("", True)
    assert field(["size"]) == ("", False)
    assert field(["digest", "x"]) == ("", False)
    assert field(["labels", "k"]) == ("v", True)
    assert mapping_adaptor({"ref": "r"})(["labels", "k"]) == ("", False)
    assert not parse("labels.k").match(mapping_adaptor({}))


def test_public_names() -> None:
    assert sorted(filters.__all__) == sorted(
        [
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
    )
    for name in filters.__all__:
        assert hasattr(filters, name)
