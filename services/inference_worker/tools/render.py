"""OpenAI chat messages in the shape Hugging Face chat templates expect.

OpenAI carries a call's `arguments` as a JSON *string*; templates `tojson` them, which would
double-encode a string, so they become a dict here (a string that is not a JSON object is left as
it is). A `tool` message gets the `name` of the call it answers, which Hermes-style templates
require and OpenAI does not send. Mistral templates keep only the last 9 characters of a call id
and its tokenizer wants them alphanumeric: for Mistral formats every id (on the calls and on the
tool results, consistently) becomes 9 alphanumerics, the last 9 of the id's own alphanumerics when
it has that many (true of ours, `call_` + 24) else derived from a hash of the id."""
from __future__ import annotations

import hashlib
import json
import string

from .formats import ToolFormat

_ALNUM = string.ascii_letters + string.digits


def mistral_call_id(call_id: str) -> str:
    alnum = "".join(c for c in call_id if c in _ALNUM)
    if len(alnum) >= 9:
        return alnum[-9:]
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(_ALNUM[b % len(_ALNUM)] for b in digest[:9])


def _arguments(raw):
    if not isinstance(raw, str):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, dict) else raw


def template_messages(messages: list[dict], fmt: ToolFormat | None = None) -> list[dict]:
    """Copies of `messages` ready for ``Tokenizer.apply_chat_template(..., tools=...)``."""
    short_ids = fmt is not None and fmt.name.startswith("mistral")
    fix_id = mistral_call_id if short_ids else (lambda i: i)
    names: dict[str, str] = {}
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or {})
                fn["arguments"] = _arguments(fn.get("arguments", {}))
                call = {**c, "function": fn, "type": c.get("type", "function")}
                if "id" in c:
                    names[c["id"]] = fn.get("name", "")
                    call["id"] = fix_id(c["id"])
                calls.append(call)
            m["tool_calls"] = calls
            if m.get("content") is None:
                m["content"] = ""  # templates concatenate it
        elif m.get("role") == "tool":
            call_id = m.get("tool_call_id")
            if "name" not in m and call_id in names:
                m["name"] = names[call_id]
            if call_id is not None:
                m["tool_call_id"] = fix_id(call_id)
        out.append(m)
    return out
