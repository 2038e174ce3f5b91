"""The weight-only quantizations a deploy may ask for (``quantize``): one list for the worker's engine
(services/inference_worker/engine/quant.py), fit (services/hardware_inventory/domain/fit.py, which books
their bytes) and the CLI. int8: per output channel, symmetric; int4: groups of 32 along the input, with
a zero point."""

QUANTIZATIONS = ("int8", "int4")
