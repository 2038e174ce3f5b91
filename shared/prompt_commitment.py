"""The commitment to a prompt that an ``inference.completed`` event carries (#19).

A bare SHA-256 of the prompt let anyone who could read the event confirm a guess ("my password is
hunter2"). Instead, each request gets a fresh random salt (32 bytes from the OS's CSPRNG, sent as 64
hex digits), and the event carries::

    prompt_commitment = HMAC-SHA256(key = bytes.fromhex(salt), message = prompt bytes)   (hex)

where the prompt bytes are
- for a completion (``prompt``): the prompt text in UTF-8, exactly as sent;
- for a chat (``messages``): the list of messages as JSON objects with exactly ``role`` and
  ``content``, serialised with sorted keys, no whitespace (``","`` and ``":"``) and UTF-8
  (non-ASCII characters as themselves, not ``\\u`` escapes), e.g. ``[{"content":"hi","role":"user"}]``.
  An assistant message with calls adds ``tool_calls`` (each ``id``, ``type``, ``function`` with ``name``
  and ``arguments``), a tool result adds ``tool_call_id``; with ``tools`` the bytes are instead the object
  ``{"messages": [...], "tools": [...]}``, each tool as sent without its null fields (not with
  ``tool_choice`` none, when the template never sees them).

The salt never enters an event or the ledger: the worker returns it to the requester only (the reply's
``prompt_salt``, and the gateway's ``x-strata-prompt-salt`` response header). With the prompt and the
salt, a requester recomputes the commitment offline (``strata receipt verify --prompt --salt``);
without the salt, a guess cannot be checked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

SALT_BYTES = 32
SALT_HEADER = "x-strata-prompt-salt"
SALT_PATTERN = r"^[0-9a-f]{64}$"


class BadSalt(ValueError):
    """A salt that is not 64 hex digits."""


def new_salt() -> str:
    return secrets.token_hex(SALT_BYTES)


def prompt_bytes(*, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None,
                 tools: Sequence[Mapping[str, Any]] | None = None) -> bytes:
    """The bytes a commitment covers (see the module's doc): give exactly one of prompt and messages;
    ``tools`` (with messages) as ``Tool.model_dump(exclude_none=True)`` gives them."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    if prompt is not None:
        if tools:
            raise ValueError("tools go with messages, not a prompt")
        return prompt.encode()
    body: Any = [_message(m) for m in messages or []]
    if tools:
        body = {"messages": body, "tools": list(tools)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _message(m: Mapping[str, Any]) -> dict[str, Any]:
    """role and content, and a tool call's or a tool result's fields only when the message has them,
    so a plain conversation's bytes are what they were before tools."""
    out = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c["id"], "type": c.get("type", "function"),
                              "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                             for c in m["tool_calls"]]
    if m.get("tool_call_id") is not None:
        out["tool_call_id"] = m["tool_call_id"]
    return out


def commit(data: bytes, salt: str) -> str:
    try:
        key = bytes.fromhex(salt)
    except ValueError:
        raise BadSalt(f"the prompt salt must be {2 * SALT_BYTES} hex digits") from None
    if len(key) != SALT_BYTES:
        raise BadSalt(f"the prompt salt must be {2 * SALT_BYTES} hex digits, this one has {2 * len(key)}")
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def matches(commitment: str, data: bytes, salt: str) -> bool:
    return hmac.compare_digest(commitment, commit(data, salt))
