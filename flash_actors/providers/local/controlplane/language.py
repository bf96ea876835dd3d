"""A small GraphQL reader: the part of the language RunPod's clients send, parsed with bounds.

What it reads: one operation (``query`` or ``mutation``, or the ``{ ... }`` shorthand), an
optional name, variable definitions with types and defaults, fields with aliases, arguments
and nested selection sets, ``__typename``, and every input value (variables, Int, Float,
strings with escapes and block strings, booleans, ``null``, enums, lists, objects). What it
refuses, each with a message naming it: fragments, directives, subscriptions and several
operations in one document.

Bounded by construction, since anyone holding the API key can send a document: at most
`MAX_DOCUMENT` characters and `MAX_TOKENS` tokens, selections and values nested at most
`MAX_DEPTH` deep (the parser recurses once per level, far below the interpreter's limit),
Int literals within GraphQL's 32 bits and Floats finite.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENT",
    "MAX_TOKENS",
    "EnumValue",
    "Field",
    "Operation",
    "RequestError",
    "VariableDefinition",
    "VariableRef",
    "parse",
    "resolve",
    "variable_values",
]

MAX_DOCUMENT = 256 * 1024
"""Longest document, in characters (RunPod's own clients send a few kilobytes)."""
MAX_TOKENS = 20_000
"""Most tokens in one document."""
MAX_DEPTH = 32
"""Deepest nesting of selection sets, and of list and object values."""

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


class RequestError(Exception):
    """A GraphQL request this server refuses; its message is the answer's ``errors[0]``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class VariableRef:
    """``$name`` inside a value, replaced by `resolve`."""

    name: str


@dataclass(frozen=True, slots=True)
class EnumValue:
    """An enum literal (``FLASHBOOT``); `resolve` makes it its name, a string."""

    name: str


@dataclass(frozen=True, slots=True)
class Field:
    """A selected field: ``alias: name(arguments) { selections }``.

    ``arguments`` hold values as parsed (with `VariableRef` and `EnumValue` inside);
    ``selections`` is None for a leaf.
    """

    name: str
    alias: str | None
    arguments: tuple[tuple[str, Any], ...]
    selections: tuple[Field, ...] | None
    position: int

    @property
    def key(self) -> str:
        """The field's key in the answer (its alias, else its name)."""
        return self.alias or self.name


@dataclass(frozen=True, slots=True)
class VariableDefinition:
    """``$name: Type = default``; ``type`` is the type as written (``EndpointInput!``)."""

    name: str
    type: str
    default: Any
    has_default: bool

    @property
    def required(self) -> bool:
        """True for a non-null type without a default."""
        return self.type.endswith("!") and not self.has_default


@dataclass(frozen=True, slots=True)
class Operation:
    """The one operation of a document."""

    kind: str  # "query" or "mutation"
    name: str | None
    variables: tuple[VariableDefinition, ...]
    selections: tuple[Field, ...]


_TOKEN = re.compile(
    r"""
    (?P<ignored>(?:[\t\n\r ,\ufeff]+|\#[^\n\r]*)+)
  | (?P<block>\"\"\"(?:\\\"\"\"|[^"\\]|\\|"(?!""))*\"\"\")
  | (?P<string>"(?:[^"\\\n\r]|\\(?:["\\/bfnrt]|u[0-9A-Fa-f]{4}))*")
  | (?P<float>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][+-]?[0-9]+)?|[eE][+-]?[0-9]+))
  | (?P<int>-?(?:0|[1-9][0-9]*))
  | (?P<name>[_A-Za-z][_0-9A-Za-z]*)
  | (?P<spread>\.\.\.)
  | (?P<punct>[!$&():=@\[\]{|}])
    """,
    re.VERBOSE,
)
_NUMBER_TAIL = re.compile(r"[_A-Za-z.]")
_LINE_BREAK = re.compile(r"\r\n|[\n\r]")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # ignored never appears; "eof" ends the list
    text: str
    position: int


def _where(source: str, position: int) -> str:
    line = source.count("\n", 0, position) + 1
    column = position - (source.rfind("\n", 0, position) + 1) + 1
    return f"line {line}, column {column}"


def _tokens(source: str) -> list[_Token]:
    if len(source) > MAX_DOCUMENT:
        msg = (
            f"the query is {len(source)} characters long; this server reads at most "
            f"{MAX_DOCUMENT}"
        )
        raise RequestError(msg)
    tokens: list[_Token] = []
    position = 0
    end = len(source)
    while position < end:
        match = _TOKEN.match(source, position)
        if match is None:
            shown = source[position : position + 10]
            msg = f"Syntax Error: unexpected character {shown[:1]!r} at {_where(source, position)}"
            if shown.startswith('"'):
                msg = f"Syntax Error: unterminated or invalid string at {_where(source, position)}"
            raise RequestError(msg)
        kind = match.lastgroup or ""
        if kind != "ignored":
            if kind in {"int", "float"} and _NUMBER_TAIL.match(source, match.end()):
                msg = f"Syntax Error: invalid number at {_where(source, position)}"
                raise RequestError(msg)
            tokens.append(_Token(kind, match.group(), position))
            if len(tokens) > MAX_TOKENS:
                msg = f"the query has more than {MAX_TOKENS} tokens; this server reads no more"
                raise RequestError(msg)
        position = match.end()
    tokens.append(_Token("eof", "", end))
    return tokens


def _string_value(token: _Token, source: str) -> str:
    try:
        value = json.loads(token.text)  # GraphQL's string escapes are JSON's
        value.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        msg = f"Syntax Error: invalid string at {_where(source, token.position)}: {exc}"
        raise RequestError(msg) from None
    if not isinstance(value, str):  # pragma: no cover - the pattern admits strings only
        raise RequestError("Syntax Error: invalid string")
    return value


def _block_string_value(text: str) -> str:
    """The value of a block string (GraphQL's BlockStringValue: common indent removed)."""
    raw = text[3:-3].replace('\\"""', '"""')
    lines = _LINE_BREAK.split(raw)
    indent: int | None = None
    for line in lines[1:]:
        stripped = len(line) - len(line.lstrip(" \t"))
        if stripped < len(line) and (indent is None or stripped < indent):
            indent = stripped
    if indent:
        lines = [lines[0], *(line[indent:] for line in lines[1:])]
    while lines and not lines[0].strip(" \t"):
        lines.pop(0)
    while lines and not lines[-1].strip(" \t"):
        lines.pop()
    return "\n".join(lines)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = _tokens(source)
        self.index = 0

    # -- tokens -----------------------------------------------------------------------------

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "eof":
            self.index += 1
        return token

    def error(self, expected: str, token: _Token | None = None) -> RequestError:
        token = token or self.token
        found = "the end of the query" if token.kind == "eof" else repr(token.text)
        return RequestError(
            f"Syntax Error: expected {expected}, found {found} at "
            f"{_where(self.source, token.position)}"
        )

    def peek(self, text: str) -> bool:
        token = self.token
        return token.kind in {"punct", "spread"} and token.text == text

    def expect(self, text: str) -> _Token:
        if not self.peek(text):
            raise self.error(repr(text))
        return self.advance()

    def skip(self, text: str) -> bool:
        if self.peek(text):
            self.advance()
            return True
        return False

    def name(self) -> str:
        if self.token.kind != "name":
            raise self.error("a name")
        return self.advance().text

    def no_directives(self) -> None:
        if self.peek("@"):
            at = self.advance()
            shown = self.token.text if self.token.kind == "name" else ""
            msg = (
                f"directives (@{shown}) are not supported by this server "
                f"({_where(self.source, at.position)}); send the query without them"
            )
            raise RequestError(msg)

    @staticmethod
    def nested(depth: int) -> int:
        if depth >= MAX_DEPTH:
            msg = f"the query is nested more than {MAX_DEPTH} levels deep"
            raise RequestError(msg)
        return depth + 1

    # -- the document -----------------------------------------------------------------------

    def document(self) -> list[Operation]:
        operations = []
        while self.token.kind != "eof":
            operations.append(self.definition())
        if not operations:
            raise RequestError("Syntax Error: the query is empty")
        return operations

    def definition(self) -> Operation:
        token = self.token
        if self.peek("{"):
            return Operation("query", None, (), self.selection_set(0))
        if token.kind != "name":
            raise self.error("an operation ('query', 'mutation' or '{')")
        if token.text == "fragment":
            msg = (
                "fragments are not supported by this server "
                f"({_where(self.source, token.position)}); write the fields out in place"
            )
            raise RequestError(msg)
        if token.text == "subscription":
            raise RequestError("subscriptions are not supported by this server")
        if token.text not in {"query", "mutation"}:
            raise self.error("an operation ('query', 'mutation' or '{')")
        kind = self.advance().text
        name = self.name() if self.token.kind == "name" else None
        variables = self.variable_definitions() if self.peek("(") else ()
        self.no_directives()
        return Operation(kind, name, variables, self.selection_set(0))

    def variable_definitions(self) -> tuple[VariableDefinition, ...]:
        self.expect("(")
        definitions: list[VariableDefinition] = []
        seen: set[str] = set()
        while not self.skip(")"):
            self.expect("$")
            name = self.name()
            if name in seen:
                msg = f'There can be only one variable named "${name}".'
                raise RequestError(msg)
            seen.add(name)
            self.expect(":")
            type_text = self.type_reference(0)
            default: Any = None
            has_default = self.skip("=")
            if has_default:
                default = self.value(0, const=True)
            self.no_directives()
            definitions.append(
                VariableDefinition(name, type_text, default, has_default)
            )
        if not definitions:
            raise self.error("a variable definition", self.tokens[self.index - 1])
        return tuple(definitions)

    def type_reference(self, depth: int) -> str:
        depth = self.nested(depth)
        if self.skip("["):
            text = f"[{self.type_reference(depth)}]"
            self.expect("]")
        else:
            text = self.name()
        if self.skip("!"):
            text += "!"
        return text

    def selection_set(self, depth: int) -> tuple[Field, ...]:
        depth = self.nested(depth)
        self.expect("{")
        fields: list[Field] = []
        while not self.skip("}"):
            if self.peek("..."):
                msg = (
                    "fragments are not supported by this server "
                    f"({_where(self.source, self.token.position)}); write the fields "
                    "out in place"
                )
                raise RequestError(msg)
            fields.append(self.field(depth))
        if not fields:
            raise self.error("a field", self.tokens[self.index - 1])
        return tuple(fields)

    def field(self, depth: int) -> Field:
        position = self.token.position
        name = self.name()
        alias = None
        if self.skip(":"):
            alias, name = name, self.name()
        arguments: list[tuple[str, Any]] = []
        if self.skip("("):
            seen: set[str] = set()
            while not self.skip(")"):
                argument = self.name()
                if argument in seen:
                    msg = f'There can be only one argument named "{argument}".'
                    raise RequestError(msg)
                seen.add(argument)
                self.expect(":")
                arguments.append((argument, self.value(depth, const=False)))
            if not arguments:
                raise self.error("an argument", self.tokens[self.index - 1])
        self.no_directives()
        selections = self.selection_set(depth) if self.peek("{") else None
        return Field(name, alias, tuple(arguments), selections, position)

    def value(self, depth: int, *, const: bool) -> Any:
        token = self.token
        kind = token.kind
        if kind == "int":
            self.advance()
            number = int(token.text)
            if not _INT_MIN <= number <= _INT_MAX:
                msg = f"Int cannot represent non 32-bit signed integer value: {token.text[:40]}"
                raise RequestError(msg)
            return number
        if kind == "float":
            self.advance()
            real = float(token.text)
            if not math.isfinite(real):
                msg = f"Float cannot represent non numeric value: {token.text[:40]}"
                raise RequestError(msg)
            return real
        if kind == "string":
            self.advance()
            return _string_value(token, self.source)
        if kind == "block":
            self.advance()
            return _block_string_value(token.text)
        if kind == "name":
            self.advance()
            if token.text in {"true", "false"}:
                return token.text == "true"
            if token.text == "null":
                return None
            return EnumValue(token.text)
        if self.peek("$"):
            if const:
                raise self.error("a constant value (no variables here)")
            self.advance()
            return VariableRef(self.name())
        if self.peek("["):
            depth = self.nested(depth)
            self.advance()
            items = []
            while not self.skip("]"):
                items.append(self.value(depth, const=const))
            return items
        if self.peek("{"):
            depth = self.nested(depth)
            self.advance()
            fields: dict[str, Any] = {}
            while not self.skip("}"):
                key = self.name()
                if key in fields:
                    msg = f'There can be only one input field named "{key}".'
                    raise RequestError(msg)
                self.expect(":")
                fields[key] = self.value(depth, const=const)
            return fields
        raise self.error("a value")


def _variables_used(value: Any, found: set[str]) -> None:
    if isinstance(value, VariableRef):
        found.add(value.name)
    elif isinstance(value, list):
        for item in value:
            _variables_used(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _variables_used(item, found)


def _fields_variables(fields: tuple[Field, ...], found: set[str]) -> None:
    for field in fields:
        for _, value in field.arguments:
            _variables_used(value, found)
        if field.selections:
            _fields_variables(field.selections, found)


def parse(source: str, operation_name: str | None = None) -> Operation:
    """The one operation of ``source`` (named ``operation_name`` if that is given).

    Raises:
        RequestError: a syntax error, something this server does not read (fragments,
            directives, subscriptions, several operations), a variable used but not
            defined, or a document over the bounds.
    """
    operations = _Parser(source).document()
    if len(operations) > 1:
        msg = (
            f"the query holds {len(operations)} operations; this server runs one "
            "operation per request"
        )
        raise RequestError(msg)
    operation = operations[0]
    if operation_name is not None and operation_name != operation.name:
        msg = f'Unknown operation named "{operation_name}".'
        raise RequestError(msg)
    used: set[str] = set()
    _fields_variables(operation.selections, used)
    defined = {definition.name for definition in operation.variables}
    for name in sorted(used - defined):
        op = f' by operation "{operation.name}"' if operation.name else ""
        msg = f'Variable "${name}" is not defined{op}.'
        raise RequestError(msg)
    return operation


def variable_values(
    operation: Operation, given: dict[str, Any] | None
) -> dict[str, Any]:
    """The operation's variables: the values given, else the defaults.

    Raises:
        RequestError: a required variable (non-null type, no default) is missing or null.
    """
    given = given or {}
    values: dict[str, Any] = {}
    for definition in operation.variables:
        if definition.name in given:
            values[definition.name] = given[definition.name]
        elif definition.has_default:
            values[definition.name] = resolve(definition.default, {})
        if definition.type.endswith("!") and values.get(definition.name) is None:
            msg = (
                f'Variable "${definition.name}" of required type "{definition.type}" '
                "was not provided."
            )
            raise RequestError(msg)
    return values


def resolve(value: Any, variables: dict[str, Any]) -> Any:
    """A parsed value with its variables replaced and its enums made strings.

    A variable not given (and without a default) is ``None``, as GraphQL treats an
    omitted nullable variable. The parser bounds the nesting, so this recursion is bounded.
    """
    if isinstance(value, VariableRef):
        return variables.get(value.name)
    if isinstance(value, EnumValue):
        return value.name
    if isinstance(value, list):
        return [resolve(item, variables) for item in value]
    if isinstance(value, dict):
        return {key: resolve(item, variables) for key, item in value.items()}
    return value
