"""Checks a torch.export (pt2) archive's contents before torch deserializes any of it.

torch.export.load trusts its archive. Read against torch 2.13
(torch/export/pt2_archive/_package.py, torch/_export/serde/serialize.py,
torch/export/_unlift.py), an archive can make it run code in these ways, each closed here:

- pickled payloads: weights/constants with ``use_pickle`` go through ``torch.load``,
  ``custom_obj_*`` constants through ``torch._C._pickle_load_obj`` and ``opaque_obj_*`` through
  ``pickle.loads``. Object constants are refused here; tensor payloads are loaded with
  weights-only unpickling forced (see safe_export.py).
- AOTInductor entries (``data/aotinductor/...``): compiled shared libraries that get loaded.
- ``expr_str`` fields: ``sympy.sympify``, i.e. eval (checked by sym_expr.py).
- node targets: resolved by ``getattr`` on torch / math / _operator and later called when the
  program runs; only aten/prims ops, a few higher-order ops and arithmetic on sizes pass.
- names that torch pastes into generated Python (``forward_arg_names``, pytree contexts, value
  names, module paths): must be plain identifiers or dotted paths.
- ``guards_code``: exec'd by ``ExportedProgram.module()``; dropped after loading, not here.

Which entries torch reads: ``_load_exported_programs`` takes *every* record whose name starts
with ``models/`` as a program (``models/model_json`` is program "model"), and records are
looked up by name case-insensitively (miniz's ``mz_zip_reader_locate_file`` with flags 0, so
``get_record("models/model.json")`` may return ``MODELS/Model.JSON``). ``check_entry_names``
therefore refuses what would make the entries torch reads differ from those vetted here:
names that are not printable ASCII, names equal but for case, any record under ``models/``
(in any case) not spelled ``models/NAME.json``, and an index that Python's zipfile and
torch's reader list differently. safe_export.py then vets every ``models/`` record and every
``*config.json`` record, read through torch's own reader.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

from arcompile.errors import ModelLoadError, UnsafeModelError
from arcompile.frontend.sym_expr import UnsafeExpression, check_sym_expr

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ARGUMENT_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)?")  # higher-order ops' arguments are ""
DOTTED = re.compile(r"[A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
# control characters other than tab and newline: "\r" ends a line in Python source, so one in a
# string torch writes into generated code (even into a comment) would start a new statement
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

ALLOWED_TARGETS = [
    re.compile(r"torch\.ops\.(aten|prims)\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?"),
    re.compile(r"torch\.ops\.higher_order\.(wrap_with_set_grad_enabled|wrap_with_autocast|cond"
               r"|while_loop|map_impl|scan|invoke_subgraph)"),
    re.compile(r"_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|neg|pos|pow|abs|eq|ne"
               r"|lt|le|gt|ge|and_|or_|xor|not_|invert|lshift|rshift)"),
    re.compile(r"torch\.(sym_max|sym_min|sym_not|sym_float|sym_int|sym_ite|sym_sum|sym_sqrt"
               r"|_sym_sqrt)"),
    re.compile(r"math\.(ceil|floor|trunc|sqrt)"),
]
IDENTIFIER_KEYS = {"name", "as_name"}
IDENTIFIER_LIST_KEYS = {"forward_arg_names", "field_names"}
DOTTED_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name",
               "user_input_name", "fqn", "class_fqn"}
VALUE_TABLES = {"tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values",
                "custom_obj_values"}
NATIVE_CODE_DIRS = ("data/aotinductor/",)  # compared in lower case
MODELS_DIR = "models/"
MODEL_ENTRY = re.compile(r"models/[A-Za-z0-9_]+\.json")
# printable ASCII without backslash: Python's zipfile decodes other bytes as cp437 while torch's
# reader hands them on raw, and miniz folds only ASCII case
ENTRY_NAME = re.compile(r"[\x20-\x5b\x5d-\x7e]+")
OBJECT_CONSTANT_PREFIXES = ("custom_obj", "opaque_obj")


def check_entry_names(records: list[str], listed: list[str], source: str) -> None:
    """Refuse archives whose entries torch could read other than as vetted (module docstring).

    ``records``: the names torch's reader gives (relative to the archive's root folder);
    ``listed``: Python's zipfile namelist (with the root folder)."""
    root = listed[0].split("/", 1)[0] + "/" if listed else ""
    stripped = [n[len(root):] if n.startswith(root) else n for n in listed]
    if sorted(stripped) != sorted(records):
        raise UnsafeModelError(f"{source}: torch and arcompile read the archive's index "
                               "differently; arcompile will not load it")
    seen: dict[str, str] = {}
    for name in records:
        if not ENTRY_NAME.fullmatch(name):
            raise UnsafeModelError(f"{source} holds an entry named {name[:60]!r} (not printable "
                                   "ASCII); arcompile will not load it")
        low = name.lower()
        if low in seen:
            raise UnsafeModelError(f"{source} holds two entries that torch cannot tell apart "
                                   f"({seen[low]!r} and {name!r}); arcompile will not load it")
        seen[low] = name
        if low.startswith(MODELS_DIR) and not MODEL_ENTRY.fullmatch(name):
            raise UnsafeModelError(f"{source} holds {name!r}, which torch would read as a "
                                   "program but is not named models/NAME.json; arcompile will "
                                   "not load it")
    check_file_names(records, source)


def check_file_names(names: list[str], source: str) -> None:
    """Refuse archives that carry compiled code for torch to load."""
    for name in names:
        if name.lower().startswith(NATIVE_CODE_DIRS):
            raise UnsafeModelError(f"{source} holds AOTInductor compiled code ({name}), which "
                                   "arcompile will not load; save the program with "
                                   "torch.export.save(ep, 'model.pt2') instead")


def check_payload_config(config: dict, source: str, entry: str) -> None:
    """Refuse pickled Python objects among an archive's constants."""
    table = config.get("config") if isinstance(config, dict) else None
    if not isinstance(table, dict) or not all(isinstance(m, dict) for m in table.values()):
        raise ModelLoadError(f"{source}: the export archive entry {entry} is not a payload "
                             "config (a table of entries); the file is corrupt")
    for fqn, meta in table.items():
        path = str(meta.get("path_name", ""))
        if path.startswith(OBJECT_CONSTANT_PREFIXES):
            raise UnsafeModelError(f"{source} holds a pickled Python object as constant '{fqn}' "
                                   f"({entry}: {path}); arcompile will not unpickle it")


def check_program_json(program: Any, source: str) -> None:
    """Walk a ``models/<name>.json`` document and refuse what could run code (module docstring)."""
    for path, key, value in _walk(program, ()):
        where = "/".join(path)
        if isinstance(value, str) and CONTROL.search(value):
            _refuse(source, f"a control character in {where}")
        if isinstance(value, dict) and any(CONTROL.search(str(k)) for k in value):
            _refuse(source, f"a control character in a key under {where}")
        if key == "expr_str":
            try:
                check_sym_expr(value)
            except UnsafeExpression as e:
                _refuse(source, f"{e} (at {where})")
        elif key == "target" and isinstance(value, str) and _is_node(path):
            _check_target(value, source, where)
        elif key == "as_operator":
            _check_target(value, source, where)
        elif key in IDENTIFIER_KEYS and value is not None:
            _expect(ARGUMENT_NAME, value, source, where)
        elif key in IDENTIFIER_LIST_KEYS and value is not None:
            for item in value if isinstance(value, list) else [value]:
                _expect(IDENTIFIER, item, source, where)
        elif key in DOTTED_KEYS and value is not None:
            _expect(DOTTED, value, source, where)
        elif key in VALUE_TABLES and isinstance(value, dict):
            for name in value:
                _expect(IDENTIFIER, name, source, where)
        elif key in ("in_spec", "out_spec") and isinstance(value, str):
            _check_treespec(value, source, where)


def _walk(obj: Any, path: tuple) -> Iterator[tuple[tuple, str | None, Any]]:
    # iterative, so a deeply nested hostile document cannot exhaust the Python stack
    stack = [(obj, path, None)]
    while stack:
        value, where, key = stack.pop()
        yield where, key, value
        if isinstance(value, dict):
            for k, v in value.items():
                stack.append((v, where + (str(k),), k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                stack.append((v, where + (str(i),), None))


def _is_node(path: tuple) -> bool:
    # nodes live in .../graph/nodes/<i>; signature specs also have "target" keys (FQNs)
    return len(path) >= 3 and path[-3] == "nodes"


def _check_target(target: Any, source: str, where: str) -> None:
    if not isinstance(target, str) or not any(p.fullmatch(target) for p in ALLOWED_TARGETS):
        raise UnsafeModelError(f"{source} calls '{str(target)[:80]}' (at {where}), which is not "
                               "an aten op or arithmetic on sizes; arcompile will not load it")


def _check_treespec(text: str, source: str, where: str) -> None:
    # pytree specs are JSON whose "context" fields are JSON again; dict keys found there become
    # argument names in the Python that ExportedProgram.module() generates
    try:
        spec = json.loads(text)
    except ValueError:
        _refuse(source, f"a pytree spec that is not JSON at {where}")
    pending = [spec]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(v for k, v in item.items() if k != "context")
            context = item.get("context")
            if isinstance(context, str):
                try:
                    pending.append(json.loads(context))
                except ValueError:
                    _refuse(source, f"a pytree context that is not JSON at {where}")
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and not DOTTED.fullmatch(item):
            _refuse(source, f"the name {item[:60]!r} in a pytree spec at {where}")


def _expect(pattern: re.Pattern, value: Any, source: str, where: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        _refuse(source, f"the name {str(value)[:60]!r} at {where}")


def _refuse(source: str, what: str) -> None:
    raise UnsafeModelError(f"{source} is a torch.export archive with {what}; arcompile will "
                           "not deserialize it because torch would evaluate it as Python")
