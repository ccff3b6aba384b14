"""A strict whitelist for the symbolic-shape expressions stored in torch.export archives.

torch's deserializer turns each ``expr_str`` of an archive into sympy with ``sympy.sympify``,
which ``eval``s the string: ``__import__('os').system(...)`` would run. So before torch sees an
archive, every expression is parsed here with ``ast`` (parsing runs nothing) and accepted only
if it is made of what torch itself writes, e.g.
``Mul(Integer(16), Symbol('s70', positive=True, integer=True))`` or ``FloorDiv(s0, 2) + 1``:
calls of known sympy / torch sympy function names, symbol names, numbers, and arithmetic.
"""

from __future__ import annotations

import ast
import re

# sympy classes as ``srepr`` prints them, and the functions torch's deserializer passes to
# sympify (``GraphModuleDeserializer.sympy_functions`` in torch/_export/serde/serialize.py).
FUNCTIONS = frozenset({
    # sympy core, relations and logic
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod",
    "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
    "Piecewise", "ExprCondPair",
    # torch.utils._sympy.functions
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
})
CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false", "int_oo"})
# keyword arguments srepr writes: Symbol assumptions and Float's precision
KEYWORDS = frozenset({
    "integer", "positive", "negative", "nonnegative", "nonpositive", "real", "finite",
    "infinite", "zero", "nonzero", "even", "odd", "rational", "extended_real", "commutative",
    "precision",
})
# torch names its shape symbols s0, u1, ps2, zuf0, ...
SYMBOL_NAME = re.compile(r"[a-z]{1,8}[0-9]{1,9}")
# strings appear only as Symbol('s0') and Float('1.5')
STRING_ARG = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}|[-+]?[0-9.]+(e[-+]?[0-9]+)?")
# exponents and shift amounts beyond this make sympy build enormous integers (a hang, not a shape)
SMALL = 64
MAX_INT = 2 ** 64
MAX_LENGTH = 100_000

_BIN_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
            ast.BitAnd, ast.BitOr)
_UNARY_OPS = (ast.USub, ast.UAdd, ast.Invert)
_COMPARE_OPS = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)
_POWERS = {"Pow", "PowByNatural", "FloatPow", "LShift"}


class UnsafeExpression(ValueError):
    """The expression holds something torch never writes (and sympify would evaluate)."""


def check_sym_expr(text: str) -> None:
    """Raise UnsafeExpression unless ``text`` is a plain symbolic-shape expression."""
    if not isinstance(text, str):
        raise UnsafeExpression(f"expression is a {type(text).__name__}, not a string")
    if len(text) > MAX_LENGTH:
        raise UnsafeExpression(f"expression is {len(text)} characters long")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise UnsafeExpression(f"expression {_short(text)} does not parse: {e.msg}") from None
    _check(tree.body, text)


def _check(node: ast.AST, text: str) -> None:
    if isinstance(node, ast.Constant):
        _check_constant(node.value, text)
    elif isinstance(node, ast.Name):
        if node.id not in CONSTANTS and not SYMBOL_NAME.fullmatch(node.id):
            _refuse(f"name '{node.id}'", text)
    elif isinstance(node, ast.Call):
        _check_call(node, text)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, _BIN_OPS):
        _check(node.left, text)
        _check(node.right, text)
        if isinstance(node.op, ast.Pow):
            _check_small_exponent(node.right, text)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARY_OPS):
        _check(node.operand, text)
    elif isinstance(node, ast.Compare) and all(isinstance(op, _COMPARE_OPS) for op in node.ops):
        for part in (node.left, *node.comparators):
            _check(part, text)
    else:
        _refuse(f"a {type(node).__name__} node", text)


def _check_call(node: ast.Call, text: str) -> None:
    # only a bare known name may be called: no attributes, no calls of calls
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        what = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        _refuse(f"a call of '{what}'", text)
    name = node.func.id
    for i, arg in enumerate(node.args):
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            if i != 0 or name not in ("Symbol", "Float") or not STRING_ARG.fullmatch(arg.value):
                _refuse(f"string {arg.value!r} in {name}()", text)
        else:
            _check(arg, text)
    for kw in node.keywords:
        if kw.arg not in KEYWORDS or not isinstance(kw.value, ast.Constant):
            _refuse(f"keyword '{kw.arg}' in {name}()", text)
        _check_constant(kw.value.value, text)
    if name in _POWERS and len(node.args) == 2:
        _check_small_exponent(node.args[1], text)


def _check_constant(value: object, text: str) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int) and abs(value) <= MAX_INT:
        return
    if isinstance(value, float):
        return
    _refuse(f"constant {_short(repr(value))}", text)


def _check_small_exponent(node: ast.AST, text: str) -> None:
    """An exponent (or shift) must involve a symbol or be one small literal, so that sympy
    cannot fold it into a number with billions of digits."""
    parts = list(ast.walk(node))
    if any(_is_symbol(n) for n in parts):
        return
    numbers = [n.value for n in parts if isinstance(n, ast.Constant)
               and isinstance(n.value, (int, float)) and not isinstance(n.value, bool)]
    if any(_is_power(n) for n in parts) or any(abs(v) > SMALL for v in numbers):
        _refuse("an exponent that is a large constant", text)


def _is_symbol(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return bool(SYMBOL_NAME.fullmatch(node.id))
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "Symbol")


def _is_power(node: ast.AST) -> bool:
    # products count too: Mul(64, 64, 64, ...) grows as fast as a power
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, (ast.Pow, ast.Mult, ast.LShift))
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _POWERS | {"Mul"})


def _refuse(what: str, text: str) -> None:
    raise UnsafeExpression(f"symbolic expression {_short(text)} contains {what}")


def _short(text: str, limit: int = 80) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."
