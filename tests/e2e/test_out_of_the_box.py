"""What a new user gets from `make run`: the built-in model deployed and answering through the
gateway, with no further step, to the official openai client."""

from __future__ import annotations

import openai
import pytest


def test_strata_up_serves_the_builtin_model_through_the_openai_api(platform):
    platform.wait_for("Strata is up", timeout=60)
    platform.wait_for("built-in model strata-builtin-kjv is serving", timeout=120)
    assert any("made an admin API key" in line for line in platform.lines), "the HTTP APIs were left open"
    anonymous = openai.OpenAI(base_url=platform.url("api-gateway") + "/v1", api_key="sk-strata-not-a-key")
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    client = openai.OpenAI(base_url=platform.url("api-gateway") + "/v1", api_key=platform.api_key)
    assert [m.id for m in client.models.list().data] == ["strata-builtin-kjv"]
    reply = client.chat.completions.create(
        model="strata-builtin-kjv", messages=[{"role": "user", "content": "In the beginning"}],
        max_tokens=24, temperature=0,
    )
    text = reply.choices[0].message.content
    assert 0 < reply.usage.completion_tokens <= 24 and reply.choices[0].finish_reason in ("stop", "length")
    words = text.split()
    assert len(words) >= 3, text
    # The corpus is the King James Bible: its commonest words come back.
    assert {"the", "and", "of", "unto", "he", "shall", "LORD", "that"} & set(words), text
