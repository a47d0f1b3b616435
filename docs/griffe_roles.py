"""A griffe extension for the documentation site (mkdocs.yml loads it): the docstrings' reST-isms as Markdown.

The library's docstrings write cross-references as Sphinx roles, ``:func:`at_level```,
``:class:`~keras_implicit.callbacks.AltLossTracker```, ``:meth:`RunConfig.validate```, which Markdown would show
as they are. Each role is resolved here, in the scope of the docstring that holds it (its object, then the
parents, through their imports; else the one public object of the package with that name), and becomes an
autorefs link, ``[`at_level`][keras_implicit.analysis.at_level]``, to the object's entry in the API reference. A
name that resolves to nothing in the package is a warning, which ``mkdocs build --strict`` turns into a failed
build. A name outside the reference (another package, a private module) stays code, without a link; one defined
in a private module links to the public module that exports it (``losses.force_path``).

Also: reST simple tables (``=====  =====`` borders) become Markdown tables (or, without a header row, a list);
Google style's singular ``Example:`` becomes ``Examples:`` (so its ``>>>`` lines are code); a literal block's
``::`` becomes ``:``; and a class whose docstring the module completes at import (``RunConfig``'s ``Attributes``,
from its fields' help) gets the completed docstring, with its fields' defaults as their values.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import inspect
import re

import griffe

PACKAGE = "keras_implicit"
ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|exc|obj|const):`([^`]+)`")
TITLED = re.compile(r"^(.*?)\s*<([^>]+)>$")  # :func:`the title <target>`
LITERAL = re.compile(r"(\S)::(\n\s*\n)")
EXAMPLE = re.compile(r"^Example:[ \t]*$", re.MULTILINE)  # Google style's singular form

BORDER = re.compile(r"^ *=+(?: +=+)+ *$")  # a reST simple table's border
FORMULA = re.compile(r"[_*|^\\]")  # a table cell that Markdown would read as emphasis or cell breaks
PLACEHOLDER = re.compile(r"^\s*\{\w+\}\s*$", re.MULTILINE)  # a docstring the module fills in at import

logger = griffe.logger


def _runtime_docstrings(objects: list) -> None:
    """Classes whose docstring the module completes at import (``RunConfig``'s ``Attributes``, from its fields'
    help) get the completed one; their dataclass fields, written ``_setting(default, help, ...)``, the default
    as their value (and as the ``__init__`` default that griffe's dataclasses extension derives from it)."""
    for obj in objects:
        if not obj.is_class or obj.docstring is None or not PLACEHOLDER.search(obj.docstring.value):
            continue
        runtime = getattr(importlib.import_module(obj.module.path), obj.name, None)
        if runtime is None or PLACEHOLDER.search(inspect.getdoc(runtime) or "{missing}"):
            logger.warning("%s: the docstring's placeholder is not filled at import", obj.path)
            continue
        obj.docstring.value = inspect.getdoc(runtime)
        if dataclasses.is_dataclass(runtime):
            for field in dataclasses.fields(runtime):
                member = obj.members.get(field.name)
                if member is not None and member.is_attribute and field.default is not dataclasses.MISSING:
                    member.value = repr(field.default)


def _lookup(obj: griffe.Object, dotted: str, index: dict):
    """The object that ``dotted`` names in ``obj``'s scope, else the one object of the package with that (dotted)
    name, or None."""
    found = _in_scope(obj, dotted)
    if found is None and not dotted.startswith(PACKAGE + "."):
        candidates = index.get(dotted, [])
        if len(candidates) == 1:
            found = candidates[0]
    return found


def _in_scope(obj: griffe.Object, dotted: str):
    head, _, rest = dotted.partition(".")
    scope = obj
    found = None
    if head == PACKAGE:
        found = obj.package
    else:
        while scope is not None:
            if head in scope.members:
                found = scope.members[head]
                break
            scope = scope.parent
    if found is None:
        return None
    for part in filter(None, rest.split(".")):
        try:
            if found.is_alias:
                found = found.final_target
            found = found.members[part]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    try:
        return found.final_target if found.is_alias else found
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return "external"


def _shown(target: griffe.Object) -> bool:
    """Whether the API reference renders ``target``: mkdocs.yml's ``filters: public``, every step of its path
    public (a module's ``__all__``, else no leading underscore), the package's root rendered alone."""
    if target.path != target.canonical_path or not target.path.startswith(PACKAGE):
        return False
    obj = target
    while obj.parent is not None:
        if not obj.is_public or (obj.parent.is_package and obj.parent.path == PACKAGE and not obj.is_module):
            return False
        obj = obj.parent
    return True


def _cells(line: str, starts: list) -> list:
    bounds = [*starts[1:], None]
    return [line[start:end].strip() for start, end in zip(starts, bounds)]


def _markdown_cell(cell: str) -> str:
    if "`" not in cell and FORMULA.search(cell):
        return f"`{cell}`"  # a pipe inside a code span does not end the cell
    return cell.replace("|", "\\|")


def _tables(text: str) -> str:
    """reST simple tables as Markdown: with a header, a pipe table; without one, a list of "first column: the rest"
    (rows continued on lines whose first column is blank)."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        if not BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        starts = [match.start() for match in re.finditer(r"=+", lines[i])]
        borders, j = [i], i + 1
        while j < len(lines) and lines[j].strip():
            if BORDER.match(lines[j]):
                borders.append(j)
                if j + 1 == len(lines) or not lines[j + 1].strip():
                    break
            j += 1
        if len(borders) not in (2, 3) or borders[-1] != j:
            logger.warning("a reST table that is not a simple table: %r", lines[i])
            out.append(lines[i])
            i += 1
            continue
        header = _cells(lines[i + 1], starts) if len(borders) == 3 else None
        rows = []
        for line in lines[borders[-2] + 1:j]:
            cells = _cells(line, starts)
            if rows and not cells[0]:
                rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells)]
            else:
                rows.append(cells)
        if header:
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + " --- |" * len(header))
            out.extend("| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in rows)
        else:
            out.extend(f"- {row[0]}: " + "; ".join(cell for cell in row[1:] if cell) for row in rows)
        i = j + 1
    return "\n".join(out)


def _rewrite(obj: griffe.Object, text: str, index: dict, published: dict) -> str:
    def replace(match: re.Match) -> str:
        content = match.group(1).strip()
        titled = TITLED.match(content)
        if titled:
            title, target = titled.group(1), titled.group(2).strip()
        else:
            target = content
            short = target.lstrip("~")
            title = short.rsplit(".", 1)[-1] if target.startswith("~") else short
        name = target.lstrip("~").removesuffix("()")
        found = _lookup(obj, name, index)
        if found is None:
            if name == PACKAGE or name.startswith(PACKAGE + ".") or ("." not in name and not hasattr(builtins, name)):
                logger.warning("%s: the cross-reference %s names nothing in %s", obj.path, match.group(0), PACKAGE)
            return f"`{title}`"
        if found == "external":
            return f"`{title}`"
        if _shown(found):
            return f"[`{title}`][{found.path}]"
        if found.path in published:  # defined in a private module, rendered where a public one exports it
            return f"[`{title}`][{published[found.path]}]"
        return f"`{title}`"

    text = ROLE.sub(replace, _tables(text))
    text = EXAMPLE.sub("Examples:", text)
    return LITERAL.sub(r"\1:\2", text)


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of the package once it is loaded (aliases resolved)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name != PACKAGE:
            return
        objects, stack = [], [pkg]
        while stack:
            obj = stack.pop()
            objects.append(obj)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
        _runtime_docstrings(objects)
        # The package's public objects by their name and their dotted names below the module:
        # "train", "RunConfig.validate".
        index = {}
        for obj in objects:
            if not _shown(obj) or obj.is_module:
                continue
            module = obj.module
            parts = obj.path.split(".")
            for start in range(len(module.path.split(".")), len(parts)):
                index.setdefault(".".join(parts[start:]), []).append(obj)
        # Objects of private modules that a rendered module exports: losses.force_path is _dispatch.force_path.
        published = {}
        for module in objects:
            if not module.is_module or not _shown(module) or module.path == PACKAGE:
                continue
            for member in module.members.values():
                if member.is_alias and member.is_public:
                    try:
                        published.setdefault(member.final_target.path, member.path)
                    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                        pass
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj, obj.docstring.value, index, published)
                vars(obj.docstring).pop("parsed", None)  # parsed again from the new text
