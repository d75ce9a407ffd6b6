"""A stranger's JSON read one value at a time, building only what the reader asks for.

``json.loads`` builds every object, list and number of a text before anyone can look at it:
a header of empty objects or short lists takes about 28 times its bytes that way. A
:class:`Scanner` walks the text instead: the reader names what it expects at each place (an
object's keys, a string, a short list of integers, a scalar it will ignore) and anything else
is refused at once, before it is built. What is kept is only what the reader keeps; a string
costs about its bytes. Strict as ``json.loads`` with fsdpck's rules: no duplicate keys, no
NaN or Infinity, nothing after the value, no nesting deeper than the reader's own calls.
"""

from __future__ import annotations

import json
import re
from json.decoder import scanstring
from typing import Callable, Container, Iterator

_WS = re.compile(r"[ \t\n\r]*")  # one greedy class, nothing after it in the pattern: no backtracking
_SPACE = frozenset(" \t\n\r")
_INT = re.compile(r"0|[1-9][0-9]{0,18}")  # a JSON integer without a sign, at most 19 digits
_NUMBER_GOES_ON = frozenset("0123456789.eE-+")  # after an integer's digits: a longer or a non-integer number
MAX_LIST = 64  # a list of integers (a shape, offsets, a byte range) has at most this many items
_SHORT_LIST = MAX_LIST * 24  # characters a list of MAX_LIST such integers, compactly written, fits in
_BEYOND = 10**19  # integers of 20 digits or more are refused as text is (_INT)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


_SCALARS = json.JSONDecoder(parse_constant=_reject_constant)


class Scanner:
    """A position in a JSON text; every refusal is ``fail(message)`` (the caller's exception)."""

    def __init__(self, text: str, fail: Callable[[str], Exception]):
        self.text = text
        self.at = 0
        self.fail = fail

    def _peek(self) -> str:
        c = self.text[self.at:self.at + 1]
        if c in _SPACE:  # most JSON has none between tokens: the pattern runs only where there is some
            self.at = _WS.match(self.text, self.at).end()
            c = self.text[self.at:self.at + 1]
        return c

    def _where(self) -> str:
        return f"at character {self.at}"

    def is_null(self) -> bool:
        """Whether ``null`` comes next (then read past it)."""
        if self._peek() == "n" and self.text.startswith("null", self.at):
            self.at += 4
            return True
        return False

    def members(self, what: str, *, track: Container[str] | None = None) -> Iterator[str]:
        """The keys of the object that comes next; after each, the caller reads its value. A key seen
        twice is refused; ``track`` limits that to the keys the caller keeps (the others' values are
        dropped unbuilt, and remembering their names would cost more than they do)."""
        if self._peek() != "{":
            raise self.fail(f"{what} is not a JSON object")
        self.at += 1
        seen: set[str] = set()
        if self._peek() == "}":
            self.at += 1
            return
        while True:
            key = self.string(f"a key of {what}")
            if track is None or key in track:
                if key in seen:
                    raise self.fail(f"{what} has the key {key[:80]!r} twice")
                seen.add(key)
            if self._peek() != ":":
                raise self.fail(f"{what} is not JSON (no ':' after the key {key[:80]!r}, {self._where()})")
            self.at += 1
            yield key
            c = self._peek()
            self.at += 1
            if c == "}":
                return
            if c != ",":
                raise self.fail(f"{what} is not JSON (expected ',' or '}}' {self._where()})")

    def string(self, what: str) -> str:
        if self._peek() != '"':
            raise self.fail(f"{what} is not a string")
        try:
            value, self.at = scanstring(self.text, self.at + 1, True)
        except ValueError as e:
            raise self.fail(f"{what} is not a JSON string ({e})") from None
        return value

    def ints(self, what: str) -> list[int]:
        """A list of at most :data:`MAX_LIST` non-negative integers, checked before anything is built."""
        refusal = f"{what} is not a list of at most {MAX_LIST} non-negative integers"
        if self._peek() != "[":
            raise self.fail(refusal)
        close = self.text.find("]", self.at, self.at + _SHORT_LIST)
        if close != -1:  # the usual short list: parsed by json itself, its few values checked after
            part = self.text[self.at:close + 1]
            try:
                values, end = _SCALARS.raw_decode(part)
            except ValueError:
                raise self.fail(refusal) from None
            if end != len(part):
                raise self.fail(refusal)
            if "-" in part or len(values) > MAX_LIST or not all(
                    type(v) is int and v < _BEYOND for v in values):  # floats, booleans, -0 and nesting refused
                raise self.fail(refusal)
            self.at = close + 1
            return values
        self.at += 1  # a long one (whitespace, or junk): walked a value at a time, never built whole
        out: list[int] = []
        if self._peek() == "]":
            self.at += 1
            return out
        while True:
            m = _INT.match(self.text, self.at)
            if m is None or len(out) == MAX_LIST or self.text[m.end():m.end() + 1] in _NUMBER_GOES_ON:
                raise self.fail(refusal)
            out.append(int(m.group()))
            self.at = m.end()
            c = self._peek()
            self.at += 1
            if c == "]":
                return out
            if c != ",":
                raise self.fail(refusal)
            self._peek()

    def scalar(self, what: str) -> None:
        """Read past a string, number, true, false or null that the reader has no use for; a list or
        an object there is refused unbuilt."""
        if self._peek() in ("[", "{"):
            raise self.fail(f"{what} is a JSON {'list' if self.text[self.at] == '[' else 'object'}, where only "
                            f"a string, a number, true, false or null is read")
        try:
            _, self.at = _SCALARS.raw_decode(self.text, self.at)
        except ValueError as e:
            raise self.fail(f"{what} is not JSON ({str(e)[:120]})") from None

    def end(self, what: str) -> None:
        if self._peek():
            raise self.fail(f"{what} has more after its JSON value ({self._where()})")
