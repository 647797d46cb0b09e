"""A JSON file parsed one value at a time from text read a chunk at a time, so a large list of
records never exists whole: not its text, not its Python objects.

Values are parsed by :mod:`json`'s own scanner (``JSONDecoder.raw_decode``); this module only
walks the containers around them and reads more text when a value may go on past what was read.
It tells whether the file is valid UTF-8 JSON, not why it is not: :class:`NotJson` carries where
it stopped, and the reader of a data file parses it whole to name the line, column and reason,
so the words are exactly :mod:`json`'s.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any, BinaryIO

_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, not str.isspace()'s
_LOOKAHEAD = 32
"""How far past a position the scanner looks to decide there: a number ends where the text stops
being one (``1e`` may yet be ``1e5``), a truncated ``-Infinity`` or ``\\uXXXX\\uXXXX`` fails
at its start. Text read this far past a value or an error makes it final."""


class RepeatedKeys:
    """An ``object_pairs_hook`` that builds each object as :mod:`json` does (the last value of a
    key wins) and keeps the keys some object wrote more than once, which :mod:`json` drops
    without a word. Costs about 0.7 us per record of four objects (a dict built from pairs)."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        built = dict(pairs)
        if len(built) != len(pairs):
            self.found += [key for key, n in Counter(key for key, _ in pairs).items() if n > 1]
        return built

    def decoder(self) -> json.JSONDecoder:
        return json.JSONDecoder(object_pairs_hook=self)


def too_much(exc: BaseException) -> str | None:
    """Why :mod:`json` could not build a value that is valid JSON: nested past the recursion
    limit, or an integer of more digits than Python converts; None for anything else."""
    if isinstance(exc, RecursionError):
        return (f"lists and objects nested too deep to read (past Python's limit of about "
                f"{sys.getrecursionlimit():,} levels): not a sample")
    if isinstance(exc, ValueError) and not isinstance(exc, json.JSONDecodeError):
        digits = re.search(r"value has (\d+) digits", str(exc))
        if digits:
            return f"a number of {int(digits.group(1)):,} digits: too long to read (at most {sys.get_int_max_str_digits():,})"
    return None


class UnreadableValue(Exception):
    """Valid JSON that :mod:`json` cannot build (:func:`too_much`), at character ``pos``."""

    def __init__(self, pos: int, reason: str) -> None:
        super().__init__(reason)
        self.pos = pos
        self.reason = reason


class NotJson(Exception):
    """The file is not UTF-8 JSON; found at character ``pos`` (past the byte-order mark)."""

    def __init__(self, pos: int) -> None:
        super().__init__(pos)
        self.pos = pos


class JsonStream:
    """The text of ``file`` (UTF-8, a leading byte-order mark dropped), parsed from the front."""

    def __init__(self, file: BinaryIO, chunk_size: int) -> None:
        self._file = file
        self._chunk_size = chunk_size
        self._decode = codecs.getincrementaldecoder("utf-8")().decode
        self.repeated_keys = RepeatedKeys()
        """Keys written twice in one object of the last value parsed (:meth:`value` clears it)."""
        self._decoder = self.repeated_keys.decoder()
        self._text = ""  # the text not yet parsed, from _text[_pos]
        self._pos = 0
        self._dropped = 0  # characters parsed and dropped before _text
        self._started = False
        self._eof = False
        self.first_newline: int | None = None
        """Where the first line ends (a character position), once text that far has been read."""

    @property
    def position(self) -> int:
        """Characters parsed so far."""
        return self._dropped + self._pos

    def past_first_line(self, pos: int | None = None) -> bool:
        pos = self.position if pos is None else pos
        return self.first_newline is not None and pos > self.first_newline

    def _read(self) -> bool:
        """Append one more chunk of text; False at the end of the file."""
        if self._eof:
            return False
        raw = self._file.read(self._chunk_size)
        self._eof = not raw
        try:
            text = self._decode(raw, final=self._eof)
        except UnicodeDecodeError as exc:  # the text before the bad byte still counts for positions
            self._append(exc.object[: exc.start].decode("utf-8"))
            raise NotJson(self._dropped + len(self._text)) from None
        self._append(text)
        return True

    def _append(self, text: str) -> None:
        if text and not self._started:
            text = text.removeprefix("\ufeff")
            self._started = True
        if self.first_newline is None and (i := text.find("\n")) >= 0:
            self.first_newline = self._dropped + len(self._text) + i
        self._dropped += self._pos
        self._text = self._text[self._pos :] + text
        self._pos = 0

    def next_char(self) -> str:
        """Whitespace skipped: the next character, ``""`` at the end of the file."""
        while True:
            self._pos = _WHITESPACE.match(self._text, self._pos).end()  # type: ignore[union-attr]
            if self._pos < len(self._text):
                return self._text[self._pos]
            if not self._read():
                return ""

    def value(self) -> Any:
        """The JSON value that starts here, whole."""
        while True:
            self.repeated_keys.found.clear()
            try:
                value, end = self._decoder.raw_decode(self._text, self._pos)
            except json.JSONDecodeError as exc:
                final = not exc.msg.startswith("Unterminated string") and exc.pos + _LOOKAHEAD <= len(self._text)
                if final or not self._read():
                    raise NotJson(self._dropped + exc.pos) from None
                continue
            except (RecursionError, ValueError) as exc:
                reason = too_much(exc)
                if reason is None:
                    raise
                raise UnreadableValue(self.position, reason) from None
            if isinstance(value, (int, float)) and end + _LOOKAHEAD > len(self._text) and self._read():
                continue
            self._pos = end
            return value

    def _expect(self, allowed: str) -> str:
        char = self.next_char()
        if not char or char not in allowed:
            raise NotJson(self.position)
        self._pos += 1
        return char

    def array(self) -> Iterator[Any]:
        """The elements of the array that starts here, one at a time."""
        self._expect("[")
        if self.next_char() == "]":
            self._pos += 1
            return
        while True:
            yield self.value()
            if self._expect(",]") == "]":
                return
            self.next_char()

    def object_keys(self) -> Iterator[str]:
        """The keys of the object that starts here; after each, the caller reads its value
        (:meth:`value`, :meth:`array`) before asking for the next."""
        self._expect("{")
        if self.next_char() == "}":
            self._pos += 1
            return
        while True:
            if self.next_char() != '"':
                raise NotJson(self.position)
            key = self.value()
            self._expect(":")
            self.next_char()
            yield key
            if self._expect(",}") == "}":
                return

    def expect_end(self) -> None:
        """Only whitespace is left."""
        if self.next_char():
            raise NotJson(self.position)
