"""Griffe extensions for the API reference: signatures as a reader needs them.

`SourceDefaults`: griffe reads a default value through ``ast``, which keeps
the number but not how it was spelled, so ``mode: int = 0o600`` would render
as ``mode=384``.  This puts the source text back for the number literals
whose spelling says more than their decimal value (octal, hex, digit groups).

`ConstructorSignatures`: griffe reads source, so it sees no ``__init__`` in
a class that ``attrs`` generates one for, nor in a class that has none of
its own; mkdocstrings then shows no signature at all.  This adds the
``__init__`` the class really has: the attrs fields in order (with their
defaults), or no parameters.  Exceptions are left alone: their heading
names their bases, and fdchannel raises them rather than users building them.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


class SourceDefaults(griffe.Extension):
    """Keep each spelled-out number literal default as it appears in the source."""

    def on_function_instance(
        self, *, node: ast.AST | griffe.ObjectNode, func: griffe.Function, **kwargs: Any
    ) -> None:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return
        filepath = func.filepath
        if isinstance(filepath, list):
            return
        try:
            lines = func.lines_collection[filepath]
        except KeyError:
            return
        args = node.args
        positional = [*args.posonlyargs, *args.args]
        pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True))
        pairs += [
            (arg, default) for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True) if default
        ]
        for arg, default in pairs:
            if not (isinstance(default, ast.Constant) and isinstance(default.value, int)):
                continue
            if default.lineno != default.end_lineno or default.end_col_offset is None:
                continue
            text = lines[default.lineno - 1][default.col_offset : default.end_col_offset]
            if text != str(default.value) and arg.arg in func.parameters:
                func.parameters[arg.arg].default = text


def _classes(obj: griffe.Object) -> list[griffe.Class]:
    found: list[griffe.Class] = []
    for member in obj.members.values():
        if member.is_alias:
            continue
        if isinstance(member, griffe.Class):
            found.append(member)
        if isinstance(member, griffe.Module | griffe.Class):
            found += _classes(member)
    return found


def _is_attrs(cls: griffe.Class) -> bool:
    return any(str(decorator.value).startswith(("attrs.", "attr.")) for decorator in cls.decorators)


class ConstructorSignatures(griffe.Extension):
    """Give attrs classes and classes without an ``__init__`` their real constructor signature."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for cls in _classes(pkg):
            if cls.module.path.endswith("._errors") or "__init__" in cls.all_members:
                continue
            parameters = [griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)]
            if _is_attrs(cls):
                for name, member in cls.members.items():
                    if member.is_alias or not isinstance(member, griffe.Attribute) or name.startswith("_"):
                        continue
                    if member.annotation is None or str(member.annotation).startswith("ClassVar"):
                        continue
                    if "property" in member.labels:  # computed, not a field
                        continue
                    parameters.append(
                        griffe.Parameter(
                            name,
                            annotation=member.annotation,
                            kind=griffe.ParameterKind.positional_or_keyword,
                            default=member.value,
                        )
                    )
            init = griffe.Function(
                "__init__",
                parameters=griffe.Parameters(*parameters),
                returns="None",
                lineno=cls.lineno,
                endlineno=cls.lineno,
            )
            cls.set_member("__init__", init)
