"""The NATS contract's sampling fields (shared/inference.py SamplingOptions), as a worker parses them
from raw bytes and hands them to the engine: optional, so an old client's request is unchanged."""

from __future__ import annotations

import json

import pytest

from shared import errors
from services.inference_worker.service_layer.choices import to_params
from services.inference_worker.service_layer.serving import parse_request


def raw(**sampling: object) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "p", "sampling": sampling}).encode()


def test_fields_reach_the_engine_params_and_absent_fields_keep_the_fast_path():
    request = parse_request(raw(presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2, min_p=0.1,
                                logit_bias={"7": 100, "3": -100}), "tiny")
    params = to_params(request.sampling)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty, params.min_p) == (
        0.5,
        -1,
        1.2,
        0.1,
    )
    assert params.logit_bias == {7: 100.0, 3: -100.0} and params.penalized
    old = to_params(parse_request(raw(temperature=0), "tiny").sampling)
    assert not old.penalized and old.logit_bias is None and old.min_p == 0


@pytest.mark.parametrize(
    ("sampling", "words"),
    [
        ({"logit_bias": {"-1": 5}}, ">= 0"),
        ({"logit_bias": {"5": 100.5}}, "[-100, 100]"),
        ({"logit_bias": {"x": 1}}, "valid integer"),
        ({"repetition_penalty": 0}, "greater than 0"),
        ({"presence_penalty": 2.1}, "less than or equal to 2"),
        ({"min_p": -0.1}, "greater than or equal to 0"),
        ({"n": 17}, "less than or equal to 16"),
        ({"n": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_values_are_refused_by_the_worker(sampling, words):
    with pytest.raises(errors.Invalid) as caught:
        parse_request(raw(**sampling), "tiny")
    assert words in caught.value.message and "sampling" in caught.value.message


def test_choice_seeds_choice_0_keeps_the_request_seed_the_others_differ_and_repeat():
    from services.inference_worker.service_layer.choices import choice_seed

    assert choice_seed(None, 3) is None and choice_seed(7, 0) == 7
    seeds = [choice_seed(7, i) for i in range(16)]
    assert len(set(seeds)) == 16 and seeds == [choice_seed(7, i) for i in range(16)]
    assert all(0 <= s < 2**63 for s in seeds) and choice_seed(8, 1) not in seeds
