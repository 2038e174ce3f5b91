"""An incremental scanner for one JSON call object, e.g. ``{"name": "f", "arguments": {...}}``.

It does not validate JSON (``json.loads`` does that once the object closes); it only tracks strings
and nesting closely enough to know, while the object is still arriving, the call's name and where
its arguments object begins and ends, so the arguments can be streamed as they come."""
from __future__ import annotations

import json


class CallScanner:
    def __init__(self, args_keys: tuple[str, ...], name: str | None = None):
        # name given: the object *is* the arguments (Mistral's `name[ARGS]{...}` form)
        self.bare = name is not None
        self.args_keys = args_keys
        self.name = name
        self.args_start: int | None = 0 if self.bare else None
        self.args_end: int | None = None
        self.raw = ""
        self.done = False
        self._depth = 0
        self._in_str = self._esc = False
        self._str_at = 0
        self._phase = "key"  # where the top level of the object is: key, value, in_value
        self._key: str | None = None

    def feed(self, text: str) -> int:
        """Read from `text` up to the end of the object; returns how many characters it took."""
        base = len(self.raw)
        self.raw += text  # once per piece: appending per character is quadratic on long arguments
        for k, ch in enumerate(text):
            self._step(base + k, ch)
            if self.done:
                self.raw = self.raw[:base + k + 1]
                return k + 1
        return len(text)

    def _step(self, i: int, ch: str) -> None:
        if self._in_str:
            if self._esc:
                self._esc = False
            elif ch == "\\":
                self._esc = True
            elif ch == '"':
                self._in_str = False
                self._string_closed(i)
            return
        if ch.isspace():
            return
        if self._depth == 1 and self._phase == "value":
            self._phase = "in_value"
            if self._key in self.args_keys and self.args_start is None and not self.bare and ch == "{":
                self.args_start = i
        if ch == '"':
            self._in_str, self._str_at = True, i
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if (self.args_start is not None and self.args_end is None
                    and self._depth == (0 if self.bare else 1)):
                self.args_end = i + 1
            self.done = self._depth <= 0
        elif self._depth == 1 and ch == ":":
            self._phase = "value"
        elif self._depth == 1 and ch == ",":
            self._phase = "key"

    def _string_closed(self, i: int) -> None:
        if self._depth != 1 or self.bare:
            return
        try:
            s = json.loads(self.raw[self._str_at:i + 1])
        except ValueError:
            return
        if self._phase == "key":
            self._key = s
        elif self._phase == "in_value" and self._key == "name" and self.name is None:
            self.name = s

    def arguments(self) -> str | None:
        """Once done: the arguments text if the object is a well-formed call, else None."""
        if not self.done or self.args_start is None or self.args_end is None or not self.name:
            return None
        try:
            obj = json.loads(self.raw)
            args_text = self.raw[self.args_start:self.args_end]
            args = json.loads(args_text)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(args, dict):
            return None
        if not self.bare and (obj.get("name") != self.name
                              or not any(obj.get(k) == args for k in self.args_keys)):
            return None
        return args_text
