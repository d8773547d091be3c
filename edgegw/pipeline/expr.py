"""A small, safe expression language for derived fields and filters: parsed once into closures, never ``eval``.

Grammar (precedence low to high)::

    expr    := or ("if" or "else" expr)?
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | cmp
    cmp     := sum (("==" | "!=" | "<" | "<=" | ">" | ">=" | "in") sum)?
    sum     := term (("+" | "-") term)*
    term    := unary (("*" | "/" | "//" | "%") unary)*
    unary   := "-" unary | power
    power   := atom ("**" unary)?
    atom    := NUMBER | STRING | "true" | "false" | "null" | NAME ("." NAME)* | NAME "(" args ")" | "(" expr ")"

A name is a field of the record (``a.b`` walks nested maps); ``device_id``, ``tenant`` and ``topic`` are the
record's context unless the payload has a field of that name. Only the functions in :data:`FUNCTIONS` exist.
Arithmetic takes numbers only (``+`` also joins strings), ``**`` is bounded, so an expression cannot allocate
without limit or run for long. A missing field or a type error raises :class:`ExprError` (the message is then
quarantined with that reason).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from edgegw.errors import EdgegwError

MAX_LENGTH = 2000
MAX_DEPTH = 40
MAX_TOKENS = 400
"""Also bounds how deep the compiled closures nest, so evaluation stays far from Python's recursion limit."""
MAX_STRING = 4096
MAX_EXPONENT = 64

Env = Mapping[str, Any]
Compiled = Callable[[Env], Any]


class ExprError(EdgegwError):
    """A syntax error (at load) or an evaluation error (per message); the message says where or why."""


_TOKEN = re.compile(r"""
    \s*(?:
      (?P<num>\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)
    | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op>\*\*|//|==|!=|<=|>=|[-+*/%<>().,])
    )""", re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "in", "if", "else", "true", "false", "null"}


def _num(x: Any, what: str) -> float | int:
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise ExprError(f"{what}: expected a number, got {type(x).__name__}")
    return x


def _fn(name: str, fn: Callable[..., Any], arity: tuple[int, int]) -> tuple[Callable[..., Any], tuple[int, int]]:
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except ExprError:
            raise
        except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
            raise ExprError(f"{name}(): {exc}") from None
    return call, arity


def _round(x: Any, n: Any = 0) -> float | int:
    return round(_num(x, "round"), int(_num(n, "round")))


def _str(x: Any) -> str:
    s = str(x)
    if len(s) > MAX_STRING:
        raise ExprError("str(): result too long")
    return s


FUNCTIONS: dict[str, tuple[Callable[..., Any], tuple[int, int]]] = {
    "abs": _fn("abs", lambda x: abs(_num(x, "abs")), (1, 1)),
    "min": _fn("min", lambda *a: min(_num(x, "min") for x in a), (1, 16)),
    "max": _fn("max", lambda *a: max(_num(x, "max") for x in a), (1, 16)),
    "round": _fn("round", _round, (1, 2)),
    "floor": _fn("floor", lambda x: math.floor(_num(x, "floor")), (1, 1)),
    "ceil": _fn("ceil", lambda x: math.ceil(_num(x, "ceil")), (1, 1)),
    "sqrt": _fn("sqrt", lambda x: math.sqrt(_num(x, "sqrt")), (1, 1)),
    "log": _fn("log", lambda x: math.log(_num(x, "log")), (1, 1)),
    "log10": _fn("log10", lambda x: math.log10(_num(x, "log10")), (1, 1)),
    "exp": _fn("exp", lambda x: math.exp(_num(x, "exp")), (1, 1)),
    "int": _fn("int", lambda x: int(x if isinstance(x, str) else _num(x, "int")), (1, 1)),
    "float": _fn("float", lambda x: float(x if isinstance(x, str) else _num(x, "float")), (1, 1)),
    "str": _fn("str", _str, (1, 1)),
    "len": _fn("len", lambda x: len(x), (1, 1)),
    "lower": _fn("lower", lambda x: str.lower(x), (1, 1)),
    "upper": _fn("upper", lambda x: str.upper(x), (1, 1)),
}
"""The whole library: nothing else is callable from an expression."""

_MISSING = object()


def lookup(env: Env, path: tuple[str, ...]) -> Any:
    value: Any = env
    for part in path:
        if not isinstance(value, Mapping):
            raise ExprError(f"field {'.'.join(path)!r} is missing")
        value = value.get(part, _MISSING)
        if value is _MISSING:
            raise ExprError(f"field {'.'.join(path)!r} is missing")
    return value


def _arith(op: str) -> Callable[[Any, Any], Any]:
    def add(a: Any, b: Any) -> Any:
        if isinstance(a, str) and isinstance(b, str):
            if len(a) + len(b) > MAX_STRING:
                raise ExprError("string too long")
            return a + b
        return _num(a, "+") + _num(b, "+")

    def power(a: Any, b: Any) -> Any:
        a, b = _num(a, "**"), _num(b, "**")
        if abs(b) > MAX_EXPONENT:
            raise ExprError(f"exponent {b} out of range (|e| <= {MAX_EXPONENT})")
        return a ** b

    def div(a: Any, b: Any) -> Any:
        return _num(a, "/") / _num(b, "/")

    def floordiv(a: Any, b: Any) -> Any:
        return _num(a, "//") // _num(b, "//")

    ops: dict[str, Callable[[Any, Any], Any]] = {
        "+": add, "-": lambda a, b: _num(a, "-") - _num(b, "-"), "*": lambda a, b: _num(a, "*") * _num(b, "*"),
        "/": div, "//": floordiv, "%": lambda a, b: _num(a, "%") % _num(b, "%"), "**": power,
    }
    fn = ops[op]

    def guarded(a: Any, b: Any) -> Any:
        try:
            return fn(a, b)
        except ZeroDivisionError:
            raise ExprError(f"division by zero in {op!r}") from None
        except OverflowError:
            raise ExprError(f"overflow in {op!r}") from None
    return guarded


def _compare(op: str) -> Callable[[Any, Any], bool]:
    def cmp(a: Any, b: Any) -> bool:
        try:
            if op == "==":
                return bool(a == b)
            if op == "!=":
                return bool(a != b)
            if op == "in":
                return a in b if isinstance(b, list | tuple | str | Mapping) else False
            if op == "<":
                return bool(a < b)
            if op == "<=":
                return bool(a <= b)
            if op == ">":
                return bool(a > b)
            return bool(a >= b)
        except TypeError:
            raise ExprError(f"cannot compare {type(a).__name__} {op} {type(b).__name__}") from None
    return cmp


class _Parser:
    def __init__(self, text: str) -> None:
        if len(text) > MAX_LENGTH:
            raise ExprError(f"expression longer than {MAX_LENGTH} characters")
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise ExprError(f"unexpected character {text[pos:].lstrip()[:1]!r} at {pos}")
            kind = m.lastgroup
            assert kind is not None
            value = m.group(kind)
            if kind == "name" and value in _KEYWORDS:
                kind = "op"
            self.tokens.append((kind, value, m.start(kind)))
            if len(self.tokens) > MAX_TOKENS:
                raise ExprError(f"expression has more than {MAX_TOKENS} tokens")
            pos = m.end()
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            raise ExprError(f"unexpected end of expression{f', expected {value!r}' if value else ''}")
        if value is not None and not (tok[0] == "op" and tok[1] == value):
            raise ExprError(f"expected {value!r} at {tok[2]}, got {tok[1]!r}")
        self.i += 1
        return tok

    def at(self, *values: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "op" and tok[1] in values

    def parse(self) -> Compiled:
        node = self.expr()
        tok = self.peek()
        if tok is not None:
            raise ExprError(f"unexpected {tok[1]!r} at {tok[2]}")
        return node

    def expr(self) -> Compiled:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError(f"expression nested deeper than {MAX_DEPTH}")
        body = self.or_()
        if self.at("if"):
            self.take("if")
            cond = self.or_()
            self.take("else")
            other = self.expr()
            self.depth -= 1
            return lambda env: body(env) if cond(env) else other(env)
        self.depth -= 1
        return body

    def or_(self) -> Compiled:
        left = self.and_()
        while self.at("or"):
            self.take()
            left = _or(left, self.and_())
        return left

    def and_(self) -> Compiled:
        left = self.not_()
        while self.at("and"):
            self.take()
            left = _and(left, self.not_())
        return left

    def not_(self) -> Compiled:
        if self.at("not"):
            self.take()
            inner = self.not_()
            return lambda env: not inner(env)
        return self.cmp()

    def cmp(self) -> Compiled:
        left = self.sum()
        if self.at("==", "!=", "<", "<=", ">", ">=", "in"):
            fn = _compare(self.take()[1])
            right = self.sum()
            return lambda env: fn(left(env), right(env))
        return left

    def _binary(self, ops: tuple[str, ...], operand: Callable[[], Compiled]) -> Compiled:
        left = operand()
        while self.at(*ops):
            fn = _arith(self.take()[1])
            left = _apply(fn, left, operand())
        return left

    def sum(self) -> Compiled:
        return self._binary(("+", "-"), self.term)

    def term(self) -> Compiled:
        return self._binary(("*", "/", "//", "%"), self.unary)

    def unary(self) -> Compiled:
        if self.at("-"):
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExprError(f"expression nested deeper than {MAX_DEPTH}")
            inner = self.unary()
            self.depth -= 1
            return lambda env: -_num(inner(env), "-")
        return self.power()

    def power(self) -> Compiled:
        base = self.atom()
        if self.at("**"):
            fn = _arith(self.take()[1])
            exponent = self.unary()
            return lambda env: fn(base(env), exponent(env))
        return base

    def atom(self) -> Compiled:
        kind, value, pos = self.take()
        if kind == "num":
            number: float | int = float(value) if any(c in value for c in ".eE") else int(value)
            return lambda env: number
        if kind == "str":
            text = _unquote(value)
            return lambda env: text
        if kind == "op":
            if value == "(":
                inner = self.expr()
                self.take(")")
                return inner
            constants = {"true": True, "false": False, "null": None}
            if value in constants:
                const = constants[value]
                return lambda env: const
            raise ExprError(f"unexpected {value!r} at {pos}")
        if self.at("("):
            return self.call(value, pos)
        path = [value]
        while self.at("."):
            self.take()
            k, part, p = self.take()
            if k != "name":
                raise ExprError(f"expected a field name at {p}, got {part!r}")
            path.append(part)
        key = tuple(path)
        if len(key) == 1:
            name = key[0]

            def field(env: Env) -> Any:
                value = env.get(name, _MISSING)
                if value is _MISSING:
                    raise ExprError(f"field {name!r} is missing")
                return value
            return field
        return lambda env: lookup(env, key)

    def call(self, name: str, pos: int) -> Compiled:
        entry = FUNCTIONS.get(name)
        if entry is None:
            raise ExprError(f"unknown function {name!r} at {pos} (known: {', '.join(sorted(FUNCTIONS))})")
        fn, (lo, hi) = entry
        self.take("(")
        args: list[Compiled] = []
        if not self.at(")"):
            args.append(self.expr())
            while self.at(","):
                self.take()
                args.append(self.expr())
        self.take(")")
        if not lo <= len(args) <= hi:
            raise ExprError(f"{name}() takes {lo}..{hi} arguments, got {len(args)}")
        if len(args) == 1:
            only = args[0]
            return lambda env: fn(only(env))
        return lambda env: fn(*(a(env) for a in args))


def _or(a: Compiled, b: Compiled) -> Compiled:
    return lambda env: bool(a(env)) or bool(b(env))


def _and(a: Compiled, b: Compiled) -> Compiled:
    return lambda env: bool(a(env)) and bool(b(env))


def _apply(fn: Callable[[Any, Any], Any], a: Compiled, b: Compiled) -> Compiled:
    return lambda env: fn(a(env), b(env))


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def compile_expr(text: str) -> Compiled:
    """Parse ``text`` once; the result evaluates it against a record (a mapping). Raises ExprError on syntax."""
    if not isinstance(text, str) or not text.strip():
        raise ExprError("empty expression")
    return _Parser(text).parse()
