"""Incremental JSON reading for files too big to load (Visual Genome's ~1 GB scene_graphs.json).

The standard library parses a whole document at once; here a chunked text buffer is fed to
``json.JSONDecoder.raw_decode`` one array element at a time, so memory is bounded by the largest
element plus one chunk, not by the file. Errors carry the file name, line, column and character
offset, exactly where ``json.loads`` would report them.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from sgmodel.graph import SceneGraph, SceneGraphError

ImportItem = SceneGraph | SceneGraphError
"""What an importer yields: a validated graph, or the reason one input row was rejected."""

Source = str | os.PathLike | IO[bytes]
"""A local path or an open binary file (prepare opens s3:// URIs itself)."""

_WS = re.compile(r"[ \t\n\r]*")
_DEFAULT_CHUNK = 1 << 20
_NEAR_END = 64
"""An error this close to the buffer's end may just be a value cut by the chunk boundary."""


class JSONStreamError(ValueError):
    """Invalid JSON (or UTF-8) in a streamed file; names the file and the position."""

    def __init__(self, name: str, msg: str, char: int, line: int, column: int, snippet: str = "") -> None:
        self.name = name
        self.msg = msg
        self.char = char
        self.line = line
        self.column = column
        self.snippet = snippet
        super().__init__(f"{name}: invalid JSON at line {line} column {column} (char {char}): {msg}")


class JSONStream:
    """Pull-parser over one JSON document from a binary file, one top-level element at a time."""

    def __init__(self, raw: IO[bytes], name: str = "<json>", chunk_size: int = _DEFAULT_CHUNK) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
        self.name = name
        self._raw = raw
        self._chunk = chunk_size
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self._decoder = json.JSONDecoder()
        self._buf = ""
        self._pos = 0
        self._base = 0  # characters before _buf[0]
        self._lines = 0  # newlines before _buf[0]
        self._col_base = 0  # characters since the last newline before _buf[0]
        self._bytes = 0
        self._eof = False

    # -- buffer
    def _fill(self) -> bool:
        """Append one chunk (dropping what was consumed); False once the file is exhausted."""
        if self._eof:
            return False
        data = self._raw.read(max(self._chunk, len(self._buf) - self._pos))
        try:
            text = self._utf8.decode(data or b"", final=not data)
        except UnicodeDecodeError as err:
            self._compact()
            raise JSONStreamError(
                self.name,
                f"invalid UTF-8 ({err.reason}) near byte {self._bytes + err.start}",
                self._base + len(self._buf),
                *self._line_col(len(self._buf)),
            ) from None
        self._bytes += len(data or b"")
        if not data:
            self._eof = True
        self._compact()
        self._buf += text
        return True

    def _compact(self) -> None:
        if not self._pos:
            return
        dropped = self._buf[: self._pos]
        newline = dropped.rfind("\n")
        if newline >= 0:
            self._lines += dropped.count("\n")
            self._col_base = len(dropped) - newline - 1
        else:
            self._col_base += len(dropped)
        self._base += self._pos
        self._buf = self._buf[self._pos :]
        self._pos = 0

    def _line_col(self, pos: int) -> tuple[int, int]:
        line = self._lines + self._buf.count("\n", 0, pos) + 1
        last = self._buf.rfind("\n", 0, pos)
        column = pos - last if last >= 0 else self._col_base + pos + 1
        return line, column

    def _error(self, msg: str, pos: int) -> JSONStreamError:
        line, column = self._line_col(pos)
        snippet = self._buf[max(0, pos - 40) : pos + 40]
        return JSONStreamError(self.name, msg, self._base + pos, line, column, snippet)

    def _peek(self) -> str:
        """Next non-whitespace character ('' at the end of the file), without consuming it."""
        while True:
            self._pos = _WS.match(self._buf, self._pos).end()
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._fill():
                return ""

    def _value(self) -> Any:
        """Decode one complete value at the current position, reading more chunks while it is cut."""
        self._peek()
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as err:
                cut = err.pos >= len(self._buf) - _NEAR_END or err.msg.startswith("Unterminated string")
                if cut and self._fill():
                    continue
                raise self._error(err.msg, err.pos) from None
            except RecursionError:
                raise self._error("nesting too deep", self._pos) from None
            if end >= len(self._buf) - _NEAR_END and self._fill():
                continue  # a number ("1" of "1.5") may go on in the next chunk
            self._pos = end
            return value

    def _expect(self, allowed: str, msg: str) -> str:
        c = self._peek()
        if not c or c not in allowed:
            raise self._error(msg, self._pos)
        self._pos += 1
        return c

    def _array_items(self) -> Iterator[Any]:
        self._expect("[", "Expecting '['")
        if self._peek() == "]":
            self._pos += 1
            return
        while True:
            yield self._value()
            if self._expect(",]", "Expecting ',' delimiter") == "]":
                return

    def _expect_end(self) -> None:
        if self._peek():
            raise self._error("Extra data", self._pos)

    # -- public
    def peek_kind(self) -> str:
        """'[' for an array, '{' for an object, another character or '' for anything else."""
        return self._peek()

    def iter_array(self) -> Iterator[Any]:
        """Elements of a top-level array."""
        yield from self._array_items()
        self._expect_end()

    def read_value(self) -> Any:
        """The whole top-level value (for small documents)."""
        value = self._value()
        self._expect_end()
        return value

    def iter_members(self, stream_keys: Iterable[str] = ()) -> Iterator[tuple[str, Any]]:
        """(key, value) of a top-level object; array values of ``stream_keys`` come as lazy iterators.

        A lazy iterator must be used before the next member is requested (the rest is skipped).
        """
        streamed = set(stream_keys)
        self._expect("{", "Expecting '{'")
        if self._peek() == "}":
            self._pos += 1
            self._expect_end()
            return
        while True:
            if self._peek() != '"':
                raise self._error("Expecting property name enclosed in double quotes", self._pos)
            key = self._value()
            self._expect(":", "Expecting ':' delimiter")
            if key in streamed and self._peek() == "[":
                items = self._array_items()
                yield key, items
                for _ in items:
                    pass
            else:
                yield key, self._value()
            if self._expect(",}", "Expecting ',' delimiter") == "}":
                break
        self._expect_end()


@contextmanager
def open_source(source: Source) -> Iterator[IO[bytes]]:
    """Open a path (closed afterwards) or pass an open binary file through (left open)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            yield handle
    else:
        yield source


def source_name(source: Source, name: str | None = None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


def json_error_item(err: JSONStreamError) -> SceneGraphError:
    """A file that stops being valid JSON becomes one error row; what was read before it is kept."""
    return SceneGraphError(
        None,
        err.name,
        err.snippet,
        f"not valid JSON at line {err.line} column {err.column} (char {err.char}): {err.msg}; "
        "the rest of the file was not read",
        "invalid_json",
    )
