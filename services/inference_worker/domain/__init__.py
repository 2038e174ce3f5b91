"""The inference-worker's domain: its engine.

The domain's model code is ``services/inference_worker/engine/`` (the scheduler, sequences, the block
manager, sampling, the model and its loader), with ``kernels/`` under it and ``llamacpp/`` as the
second runtime; ``tools/`` holds the pure logic of tool calls (formats, grammar, parsing the stream).
They stay where they are (their paths are the engine's public names, used by tests and benchmarks);
this package is where new pure worker logic goes. No NATS, no file I/O and no prometheus_client here:
the service layer (``service_layer/``) drives the engine, adapters (``adapters/``) do the I/O.
"""
