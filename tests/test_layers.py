"""The package's layers: no import cycle, POSIX-only names in one module, one owner per constant.

These read the source (ast) and import the package in a child interpreter
stripped of what Windows lacks, so a change that breaks the layering fails
here on Linux, before any Windows run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fdchannel"


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_targets(node: ast.ImportFrom | ast.Import, package: str, known: set[str]) -> set[str]:
    """The package modules one import statement names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = {target} if target in known and node.module is not None else set()
    found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known)
    return found


def _runtime_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules *module* imports when it runs (anywhere in it, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom | ast.Import):
            found.update(_import_targets(node, package, known))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _runtime_imports(name, path, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    graph = _graph()
    # Package __init__ modules re-export their children: an edge from a child
    # to its own package is the child importing a sibling through it.
    for name, deps in graph.items():
        deps.difference_update({d for d in deps if name.startswith(d + ".")})
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_cycle_check_sees_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        # What Channel's own methods call sits below it ...
        ("fdchannel._core", "fdchannel._channel"),
        ("fdchannel._outbox", "fdchannel._core"),
        ("fdchannel._codec", "fdchannel._outbox"),
        ("fdchannel._peer", "fdchannel._channel"),
        ("fdchannel._shared", "fdchannel._core"),
        ("fdchannel._handoff", "fdchannel._channel"),
        ("fdchannel._wait", "fdchannel._channel"),
        # ... and what creates channels sits above it.
        ("fdchannel._channel", "fdchannel._listener"),
        ("fdchannel._channel", "fdchannel._process"),
        ("fdchannel._channel", "fdchannel._nested"),
        ("fdchannel._listener", "fdchannel.aio"),
        ("fdchannel._listener", "fdchannel._structured"),
        ("fdchannel._structured", "fdchannel.trio"),
        ("fdchannel._structured", "fdchannel.anyio"),
        # The Win32 interface sits below both the protocol and the adapter.
        ("fdchannel.transports._winapi", "fdchannel.transports._windows"),
        ("fdchannel.transports._winapi", "fdchannel.transports._win32"),
    ],
)
def test_layer_order(lower: str, upper: str) -> None:
    graph = _graph()
    seen: set[str] = set()
    todo = [lower]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(graph[node])
    assert upper not in seen, f"{lower} reaches {upper}: the layers are inverted"
    assert _reaches(graph, upper, lower), f"{upper} does not use {lower}"


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen: set[str] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return False


#: Names of the socket API that exist on POSIX only.
POSIX_ONLY = {"SCM_RIGHTS", "sendmsg", "recvmsg", "recvmsg_into", "MSG_CTRUNC", "CMSG_SPACE", "CMSG_LEN"}


def test_posix_socket_names_live_in_the_posix_io_module() -> None:
    # fdpass.py speaks IO::FDPass's own one-byte protocol with sendmsg/recvmsg
    # but reads the ancillary data through _posixio.
    allowed = {"_posixio.py", "fdpass.py"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in POSIX_ONLY:
                offenders.append(f"{path.name}:{node.lineno}: {node.attr}")
    assert not offenders


_OWNED = {"SCM_MAX_FD", "HEADER_SIZE", "_HEADER_BYTES"}


def test_one_owner_per_constant() -> None:
    """SCM_MAX_FD, the header size and the header formats are defined once, in the codec."""
    definitions: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id in {
                    "SCM_MAX_FD",
                    "HEADER_SIZE",
                    "_HEADER_BYTES",
                }:
                    definitions.setdefault(target.id, []).append(path.name)
            if isinstance(node, ast.Constant) and node.value in ("<4sBBHIIQ", "<QIIQ"):
                definitions.setdefault(str(node.value), []).append(path.name)
    assert definitions == {
        "SCM_MAX_FD": ["_codec.py"],
        "HEADER_SIZE": ["_codec.py"],
        "<4sBBHIIQ": ["_codec.py"],
        "<QIIQ": ["_codec.py"],
    }


def test_private_names_of_other_modules_are_not_imported() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                for alias in node.names:
                    if alias.name.startswith("_") and not (node.module is None or alias.name[1:2] == "_"):
                        offenders.append(f"{path.name}:{node.lineno}: {node.module}.{alias.name}")
    assert not offenders


_STRIP_POSIX = """
import select, socket, sys
# What the Windows build of CPython lacks (see docs/portability.md).
for name in ("SCM_RIGHTS", "MSG_CTRUNC", "MSG_DONTWAIT", "MSG_NOSIGNAL", "MSG_CMSG_CLOEXEC",
             "CMSG_SPACE", "CMSG_LEN", "AF_UNIX", "SO_PEERCRED"):
    if hasattr(socket, name):
        delattr(socket, name)
class _Hidden:
    def __get__(self, obj, cls=None):
        raise AttributeError("not on Windows")
class _Socket(socket.socket):
    sendmsg = recvmsg = recvmsg_into = _Hidden()
socket.socket = _Socket
if hasattr(select, "poll"):
    del select.poll
import fdchannel, fdchannel.aio, fdchannel.transports
from fdchannel._sockio import HAVE_ANCILLARY
assert not HAVE_ANCILLARY
print("imported")
"""


def test_the_package_imports_without_the_posix_socket_api() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _STRIP_POSIX], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"
