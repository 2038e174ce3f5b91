"""api-gateway's public surface for use in another process's own code: the CLI, bench/ and other tools
import these names, never the modules behind them (tests/foundation/test_contracts.py checks it).

- ``ChatCompletionRequest``: an OpenAI chat request as the gateway reads it, so that `strata receipt
  verify --messages-file` rebuilds the prompt bytes the gateway committed to;
- ``quota_bucket_config``: the quota bucket, as `strata up` provisions it.

In-process, for benchmarks (bench/gateway_app.py, bench/gateway_quota.py): ``create_service`` and its
``Gateway`` part with a ``Caller``, ``chat_completion`` (an inference reply rendered as OpenAI's), and
the quota ``Metering`` over ``QuotaCounters`` (``InMemoryQuotaCounters``, ``KvQuotaCounters``).

The request models are the gateway's own reading of OpenAI's API (its validation is the gateway's
behaviour), so they stay in the service; what it sends the workers is in shared/inference.py.
"""

from services.api_gateway.adapters.quota_counters import (
    InMemoryQuotaCounters, KvQuotaCounters, QuotaCounters, quota_bucket_config,
)
from services.api_gateway.domain.render import chat_completion
from services.api_gateway.domain.requests import ChatCompletionRequest
from services.api_gateway.entrypoints.app import create_service
from services.api_gateway.service_layer.handlers import Caller, Gateway
from services.api_gateway.service_layer.metering import Metering

__all__ = [
    "Caller", "ChatCompletionRequest", "Gateway", "InMemoryQuotaCounters", "KvQuotaCounters", "Metering",
    "QuotaCounters", "chat_completion", "create_service", "quota_bucket_config",
]
