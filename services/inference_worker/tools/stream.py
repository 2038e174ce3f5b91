"""The one parser every format shares: it turns generated text, fed in arbitrary pieces, into
content and OpenAI-shaped tool-call deltas. A format only says which markers surround its calls.

``hold_calls=True`` keeps each call back until it has closed and checked out, so malformed calls
come back as content; that is what ``ToolFormat.parse`` uses. Streaming (``hold_calls=False``)
sends a call's header once its name and the start of its arguments are known, and the arguments
as they arrive; a call that turns out malformed after its header went out cannot be taken back."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .scan import CallScanner
from .types import ContentDelta, Delta, IdFactory, ToolCallDelta

if TYPE_CHECKING:
    from .formats import ToolFormat

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is the start of `marker` (and so may become it)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class StreamParser:
    def __init__(self, fmt: "ToolFormat", id_factory: IdFactory, hold_calls: bool = False):
        self.fmt, self._new_id, self._hold = fmt, id_factory, hold_calls
        self._buf = ""
        self._state = "start" if fmt.bare_json_start else "text"
        self._pending = ""       # raw text of the current region, given back as content on failure
        self._lstrip = False     # whitespace right after a call is not content
        self._in_array = False
        self._scan: CallScanner | None = None
        self._index = 0
        self._header_sent = False
        self._args_sent = 0
        self._out: list[Delta] = []

    def feed(self, delta_text: str) -> list[Delta]:
        self._buf += delta_text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        self._run(final=True)
        if self._state == "call" and self._header_sent:
            pass  # truncated arguments (e.g. max_tokens): what was streamed stands
        elif self._state in ("open", "call_start", "call", "name"):
            self._fail()
        self._content(self._buf)
        self._buf = ""
        return self._take()

    # -- plumbing ---------------------------------------------------------------------------
    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def _content(self, text: str) -> None:
        if text:
            if self._out and isinstance(self._out[-1], ContentDelta):
                self._out[-1] = ContentDelta(self._out[-1].text + text)
            else:
                self._out.append(ContentDelta(text))

    def _run(self, final: bool) -> None:
        while getattr(self, "_on_" + self._state)(final):
            pass

    def _skip_ws(self) -> str:
        s = self._buf.lstrip()
        self._pending += self._buf[:len(self._buf) - len(s)]
        self._buf = s
        return s

    def _eat(self, n: int, state: str) -> bool:
        self._pending += self._buf[:n]
        self._buf = self._buf[n:]
        self._state = state
        return True

    def _fail(self) -> bool:
        """Not a call after all: what was read since the marker is content."""
        if not self._header_sent:
            self._content(self._pending + (self._scan.raw if self._scan else ""))
        self._end_call()
        self._pending, self._state, self._in_array = "", "text", False
        return True

    def _end_call(self) -> None:
        if self._header_sent:
            self._index += 1
        self._scan, self._header_sent = None, False

    # -- states -----------------------------------------------------------------------------
    def _on_start(self, final: bool) -> bool:
        # Llama may answer with a bare JSON call and no marker at all.
        s = self._buf.lstrip()
        if not s and not final:
            return False
        self._state = "call_start" if s.startswith("{") else "text"
        return True

    def _on_text(self, final: bool) -> bool:
        if self._lstrip:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._lstrip = False
        i = self._buf.find(self.fmt.start)
        if i >= 0:
            before = self._buf[:i].rstrip()
            self._content(before)
            self._pending = self._buf[len(before):i + len(self.fmt.start)]
            self._buf = self._buf[i + len(self.fmt.start):]
            self._state = "open"
            return True
        if not final:  # hold back what may turn into a marker, and whitespace that may precede one
            cut = len(self._buf) - _partial_suffix(self._buf, self.fmt.start)
            cut = len(self._buf[:cut].rstrip())
            self._content(self._buf[:cut])
            self._buf = self._buf[cut:]
        return False

    def _on_open(self, final: bool) -> bool:
        s = self._skip_ws()
        opener = self.fmt.array_open
        if opener and s.startswith(opener):
            self._in_array = True
            return self._eat(len(opener), "call_start")
        if s.startswith("{"):
            return self._eat(0, "call_start")
        if self.fmt.args_marker and s:
            return self._eat(0, "name")
        if not s or (opener and opener.startswith(s)):
            return False if not final else self._fail()
        return self._fail()

    def _on_name(self, final: bool) -> bool:
        j = self._buf.find(self.fmt.args_marker)
        if j < 0:
            head = self._buf[:len(self._buf) - _partial_suffix(self._buf, self.fmt.args_marker)]
            if final or (head and not _NAME.fullmatch(head)):
                return self._fail()
            return False
        name = self._buf[:j]
        if not _NAME.fullmatch(name):
            return self._fail()
        self._scan = CallScanner(self.fmt.args_keys, name=name)
        return self._eat(j + len(self.fmt.args_marker), "call_start")

    def _on_call_start(self, final: bool) -> bool:
        s = self._skip_ws()
        if not s:
            return self._fail() if final else False
        if not s.startswith("{"):
            return self._fail()
        if self._scan is None:
            self._scan = CallScanner(self.fmt.args_keys)
        self._state = "call"
        return True

    def _on_call(self, final: bool) -> bool:
        sc = self._scan
        self._buf = self._buf[sc.feed(self._buf):]
        if not self._hold:
            self._stream_call(sc)
        if not sc.done:
            return False
        args = sc.arguments()
        if args is None:
            return self._fail()
        if self._hold:
            self._out.append(ToolCallDelta(self._index, "", self._new_id(), sc.name))
            self._out.append(ToolCallDelta(self._index, args))
            self._header_sent = True
        self._end_call()
        self._pending, self._state = "", "after"
        return True

    def _stream_call(self, sc: CallScanner) -> None:
        if not self._header_sent and sc.name and sc.args_start is not None:
            self._out.append(ToolCallDelta(self._index, "", self._new_id(), sc.name))
            self._header_sent, self._args_sent = True, sc.args_start
        if self._header_sent:
            end = sc.args_end if sc.args_end is not None else len(sc.raw)
            if end > self._args_sent:
                self._out.append(ToolCallDelta(self._index, sc.raw[self._args_sent:end]))
                self._args_sent = end

    def _on_after(self, final: bool) -> bool:
        s = self._buf.lstrip()
        seps, closes = ((",", "]") if self._in_array else (self.fmt.separator, self.fmt.end))
        for tok, state in ((seps, "call_start"), (closes, "text")):
            if tok and s.startswith(tok):
                self._buf = s[len(tok):]
                self._pending = ""
                self._state = state
                self._lstrip = state == "text"
                if state == "text":
                    self._in_array = False
                return True
        if not final and any(t and t.startswith(s) for t in (seps, closes)):
            return False  # only whitespace or a partial separator/end so far
        # anything else: the calls are over (a missing end marker is forgiven) and the rest is text
        self._buf, self._state, self._lstrip, self._in_array = s, "text", True, False
        return True
