"""response_format end to end: the openai client (sync, async, stream, n, and its own ``parse`` helper)
→ the gateway → NATS → a real inference-worker whose engine enforces the schema with a grammar, on a
random-weight checkpoint. Every answer must parse and validate; a schema that cannot compile is a 400
that says why, before any stream starts."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel, Field

from tests.e2e.test_sampling_fields import CHAT, stack, sync_client
from tests.engine.conftest import _one_torch_thread, tokenizer_dir  # noqa: F401  (fixtures)
from tests.inference_worker.conftest import ckpts  # noqa: F401  (fixtures)

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.timeout(180)


class Person(BaseModel):
    """What openai's ``parse`` turns into a strict json_schema (every field required, no extras)."""
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    member: bool


SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["city", "rank"],
    "properties": {"city": {"enum": ["Oslo", "Lima", "Pune"]}, "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}


def valid(text: str) -> dict:
    data = json.loads(text)
    jsonschema.validate(data, SCHEMA)
    return data


async def test_every_answer_matches_the_schema(nats_server, tmp_path, ckpts):  # noqa: F811
    async with stack(nats_server, tmp_path, ckpts) as (gateway, _engine):
        client = gateway.client()
        answers = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model="tiny", messages=CHAT, max_tokens=60, temperature=1.0, seed=seed, response_format=FORMAT
                )
                for seed in range(12)
            ]
        )
        for a in answers:
            assert a.choices[0].finish_reason == "stop"
            valid(a.choices[0].message.content)

        many = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=60, temperature=1.0, seed=5, n=6, response_format=FORMAT
        )
        assert len(many.choices) == 6 and all(valid(c.message.content) for c in many.choices)

        stream = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=60, temperature=0, stream=True, response_format=FORMAT
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        whole = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=60, temperature=0, response_format=FORMAT
        )
        assert streamed == whole.choices[0].message.content and valid(streamed)

        completion = await client.completions.create(
            model="tiny", prompt="It was", max_tokens=60, temperature=0, extra_body={"response_format": FORMAT}
        )
        valid(completion.choices[0].text)

        parsed = await asyncio.to_thread(
            sync_client(gateway).chat.completions.parse,
            model="tiny",
            messages=CHAT,
            max_tokens=80,
            temperature=0.8,
            seed=1,
            response_format=Person,
        )
        person = parsed.choices[0].message.parsed
        assert isinstance(person, Person) and 0 <= person.age <= 120

        plain = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
        text = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=8, temperature=0, response_format={"type": "text"}
        )
        assert text.choices[0].message.content == plain.choices[0].message.content


async def test_a_schema_that_cannot_compile_is_a_400_with_the_reason(nats_server, tmp_path, ckpts):  # noqa: F811
    async with stack(nats_server, tmp_path, ckpts) as (gateway, _engine):
        client = gateway.client()
        bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(
                    model="tiny", messages=CHAT, max_tokens=8, stream=stream, response_format=bad
                )
            assert caught.value.status_code == 400 and "nonsense" in caught.value.message
        with pytest.raises(openai.BadRequestError, match="json_schema"):
            await client.chat.completions.create(model="tiny", messages=CHAT, response_format={"type": "json_schema"})
        # and the worker still serves
        ok = await client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=60, temperature=0, response_format=FORMAT
        )
        valid(ok.choices[0].message.content)
