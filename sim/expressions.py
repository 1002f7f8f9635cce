"""A tiny DynamoDB expression evaluator: the condition and update shapes the lease uses.

Conditions: ``attribute_exists``/``attribute_not_exists``, comparisons (``= <> < <= > >=``),
``AND``, ``OR``, ``NOT`` and parentheses. Updates: ``SET path = operand [+|- operand]``
where an operand may be ``if_not_exists(path, operand)``. Names and values come through
``#name`` and ``:value`` placeholders; an undefined or unused placeholder, or a reserved
word used bare, is a ``ValidationException`` as on DynamoDB.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from botocore.exceptions import ClientError

from sim.calls import aws_error

AttributeValue = Mapping[str, Any]
Item = dict[str, dict[str, Any]]

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<name>#[A-Za-z0-9_]+)|(?P<value>:[A-Za-z0-9_]+)|(?P<word>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op><>|<=|>=|[=<>(),+-]))"
)
# A few of DynamoDB's ~570 reserved words, those an attribute is likely to be called.
RESERVED = frozenset(
    {
        "COUNT",
        "DATA",
        "DATE",
        "KEY",
        "NAME",
        "OWNER",
        "POOL",
        "SIZE",
        "STATUS",
        "TIME",
        "TIMESTAMP",
        "TTL",
        "TYPE",
        "USER",
        "VALUE",
    }
)
_COMPARATORS = ("=", "<>", "<", "<=", ">", ">=")


def _invalid(kind: str, why: str) -> ClientError:
    return aws_error("ValidationException", f"Invalid {kind}: {why}", "UpdateItem")


@dataclass
class Context:
    """The placeholders of one request, and which of them the expressions used."""

    names: Mapping[str, str]
    values: Mapping[str, AttributeValue]
    used_names: set[str] = field(default_factory=set)
    used_values: set[str] = field(default_factory=set)

    def check_all_used(self) -> None:
        """DynamoDB refuses placeholders no expression uses."""
        unused_names = sorted(set(self.names) - self.used_names)
        if unused_names:
            raise aws_error(
                "ValidationException",
                "Value provided in ExpressionAttributeNames unused in expressions: "
                f"keys: {{{', '.join(unused_names)}}}",
                "UpdateItem",
            )
        unused_values = sorted(set(self.values) - self.used_values)
        if unused_values:
            raise aws_error(
                "ValidationException",
                "Value provided in ExpressionAttributeValues unused in expressions: "
                f"keys: {{{', '.join(unused_values)}}}",
                "UpdateItem",
            )


class _Parser:
    def __init__(self, text: str, kind: str, ctx: Context) -> None:
        self.kind = kind
        self.ctx = ctx
        self.tokens: list[tuple[str, str]] = []
        position = 0
        text = text.rstrip()
        while position < len(text):
            match = _TOKEN_RE.match(text, position)
            if match is None or match.end() == position:
                raise _invalid(kind, f'Syntax error; token: "{text[position:].split()[0]}"')
            group = match.lastgroup
            assert group is not None  # noqa: S101 - the pattern has only named groups
            self.tokens.append((group, match[group]))
            position = match.end()
        self.position = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def next(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise _invalid(self.kind, 'Syntax error; token: "<EOF>"')
        self.position += 1
        return token

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == "word" and token[1].upper() == word:
            self.position += 1
            return True
        return False

    def expect(self, op: str) -> None:
        kind, text = self.next()
        if kind != "op" or text != op:
            raise _invalid(self.kind, f'Syntax error; token: "{text}"')

    def done(self) -> None:
        token = self.peek()
        if token is not None:
            raise _invalid(self.kind, f'Syntax error; token: "{token[1]}"')

    # -- operands ------------------------------------------------------------------------

    def path(self) -> str:
        kind, text = self.next()
        if kind == "name":
            if text not in self.ctx.names:
                raise _invalid(
                    self.kind,
                    "An expression attribute name used in the document path is not defined; "
                    f"attribute name: {text}",
                )
            self.ctx.used_names.add(text)
            return self.ctx.names[text]
        if kind == "word":
            if text.upper() in RESERVED:
                raise _invalid(
                    self.kind, f"Attribute name is a reserved keyword; reserved keyword: {text}"
                )
            return text
        raise _invalid(self.kind, f'Syntax error; token: "{text}"')

    def operand(self) -> tuple[str, str]:
        token = self.peek()
        if token is not None and token[0] == "value":
            self.position += 1
            if token[1] not in self.ctx.values:
                raise _invalid(
                    self.kind,
                    "An expression attribute value used in expression is not defined; "
                    f"attribute value: {token[1]}",
                )
            self.ctx.used_values.add(token[1])
            return "value", token[1]
        return "path", self.path()


def _number(value: AttributeValue) -> Decimal | None:
    if "N" not in value:
        return None
    try:
        return Decimal(str(value["N"]))
    except InvalidOperation:
        return None


def _resolve(operand: tuple[str, str], item: Item, ctx: Context) -> AttributeValue | None:
    kind, ref = operand
    return ctx.values[ref] if kind == "value" else item.get(ref)


def _compare(op: str, left: AttributeValue | None, right: AttributeValue | None) -> bool:
    if left is None or right is None:
        return op == "<>" and (left is None) != (right is None)
    if set(left) != set(right):
        return op == "<>"
    a: Any
    b: Any
    if "N" in left:
        a, b = _number(left), _number(right)
    elif "S" in left:
        a, b = str(left["S"]), str(right["S"])
    else:
        a, b = dict(left), dict(right)
        if op not in ("=", "<>"):
            return False
    if op == "=":
        return bool(a == b)
    if op == "<>":
        return bool(a != b)
    return bool({"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op])


def evaluate_condition(text: str, item: Item, ctx: Context) -> bool:
    """Whether ``item`` (empty: no item) satisfies a ConditionExpression."""
    parser = _Parser(text, "ConditionExpression", ctx)

    def disjunction() -> bool:
        result = conjunction()
        while parser.keyword("OR"):
            right = conjunction()
            result = result or right
        return result

    def conjunction() -> bool:
        result = negation()
        while parser.keyword("AND"):
            right = negation()
            result = result and right
        return result

    def negation() -> bool:
        if parser.keyword("NOT"):
            return not negation()
        return primary()

    def primary() -> bool:
        token = parser.peek()
        if token == ("op", "("):
            parser.next()
            result = disjunction()
            parser.expect(")")
            return result
        if (
            token is not None
            and token[0] == "word"
            and token[1]
            in (
                "attribute_exists",
                "attribute_not_exists",
            )
        ):
            parser.next()
            parser.expect("(")
            name = parser.path()
            parser.expect(")")
            return (name in item) == (token[1] == "attribute_exists")
        left = parser.operand()
        kind, op = parser.next()
        if kind != "op" or op not in _COMPARATORS:
            raise _invalid("ConditionExpression", f'Syntax error; token: "{op}"')
        right = parser.operand()
        return _compare(op, _resolve(left, item, ctx), _resolve(right, item, ctx))

    result = disjunction()
    parser.done()
    return result


def apply_update(text: str, item: Item, ctx: Context, key_attribute: str) -> Item:
    """The item after an UpdateExpression of ``SET`` clauses (values read before any set)."""
    parser = _Parser(text, "UpdateExpression", ctx)
    if not parser.keyword("SET"):
        raise _invalid("UpdateExpression", "only SET clauses are simulated")

    def term() -> AttributeValue:
        token = parser.peek()
        if token == ("word", "if_not_exists"):
            parser.next()
            parser.expect("(")
            name = parser.path()
            parser.expect(",")
            fallback = term()
            parser.expect(")")
            return item.get(name, fallback)
        operand = parser.operand()
        value = _resolve(operand, item, ctx)
        if value is None:
            raise _invalid(
                "UpdateExpression",
                "The provided expression refers to an attribute that does not exist in the item",
            )
        return value

    def value() -> AttributeValue:
        left = term()
        token = parser.peek()
        if token in (("op", "+"), ("op", "-")):
            parser.next()
            right = term()
            a, b = _number(left), _number(right)
            if a is None or b is None:
                raise _invalid(
                    "UpdateExpression",
                    "Incorrect operand type for operator or function; operator: "
                    f"{token[1] if token else '+'}, operand type: not a number",
                )
            total = a + b if token == ("op", "+") else a - b
            return {"N": _format(total)}
        return left

    assignments: list[tuple[str, AttributeValue]] = []
    while True:
        name = parser.path()
        if name == key_attribute:
            raise aws_error(
                "ValidationException",
                f"One or more parameter values were invalid: Cannot update attribute "
                f"{name}. This attribute is part of the key",
                "UpdateItem",
            )
        parser.expect("=")
        assignments.append((name, value()))
        if parser.peek() != ("op", ","):
            break
        parser.next()
    parser.done()
    updated = {k: dict(v) for k, v in item.items()}
    for name, new in assignments:
        updated[name] = dict(new)
    return updated


def _format(number: Decimal) -> str:
    text = format(number.normalize(), "f")
    return text if text not in ("-0",) else "0"
