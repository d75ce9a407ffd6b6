"""Every test of the suite can fail: a test function that asserts nothing passes whatever the code does.

A test counts as checking something when its body (or a helper of its own file, or of
conftest.py / ckpt_factory.py, that it calls, followed through further helpers) contains an
``assert``, a ``pytest.raises`` / ``pytest.fail`` / ``pytest.warns``, or a call of a helper named
``check_*`` / ``assert_*`` that does. The detector itself is held to a file that has such a test.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SHARED = ("conftest.py", "ckpt_factory.py")
PYTEST_CHECKS = {"raises", "fail", "warns"}


def _functions(tree: ast.Module) -> dict[str, ast.AST]:
    return {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _called_name(call: ast.Call) -> str | None:
    f = call.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute):
        return f.attr
    return None


def _checks(fn: ast.AST, helpers: dict[str, ast.AST], seen: set[str]) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = _called_name(node)
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "pytest" \
                    and f.attr in PYTEST_CHECKS:
                return True
            if name and name not in seen and name in helpers:
                seen.add(name)
                if _checks(helpers[name], helpers, seen):
                    return True
    return False


def unchecked_tests(source: str, shared: dict[str, ast.AST]) -> list[str]:
    """The names of the test functions in ``source`` that check nothing."""
    tree = ast.parse(source)
    helpers = {**shared, **_functions(tree)}
    return [name for name, fn in _functions(tree).items()
            if name.startswith("test_") and not _checks(fn, helpers, {name})]


def _shared_helpers() -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for name in SHARED:
        path = TESTS / name
        if path.exists():
            out.update(_functions(ast.parse(path.read_text())))
    return out


def test_every_test_function_of_the_suite_checks_something():
    shared = _shared_helpers()
    found = {str(p.relative_to(TESTS)): unchecked_tests(p.read_text(), shared)
             for p in sorted(TESTS.rglob("test_*.py"))}
    assert len(found) > 20  # the suite was found
    assert {path: names for path, names in found.items() if names} == {}


def test_the_detector_finds_a_test_that_asserts_nothing():
    source = '''
import pytest

def helper_that_asserts(x):
    assert x

def helper_that_does_not(x):
    return x

def test_direct():
    assert 1

def test_through_a_helper():
    helper_that_asserts(1)

def test_raises():
    with pytest.raises(ValueError):
        int("x")

def test_silent():
    helper_that_does_not(1)

def test_empty():
    pass
'''
    assert unchecked_tests(source, {}) == ["test_silent", "test_empty"]
