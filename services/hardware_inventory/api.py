"""hardware-inventory's public surface for use in another process's own code: the CLI, bench/ and other
tools import these names, never the modules behind them (tests/foundation/test_contracts.py checks it).

- ``parse_constraint``: a placement constraint ``KEY=VALUE`` as deploy and fit read it (`strata fit`,
  `strata deploy --constraint`), so that the CLI refuses a bad one before asking;
- ``inventory_bucket_config``: the inventory bucket, as `strata up` provisions it;
- ``predict`` and ``dtype_name``: the memory-fit formula, for bench/fit.py's comparison with measurements.

They are the registry's own rules, so they stay in the service; its records and RPC bodies are in
shared/inventory.py.
"""

from services.hardware_inventory.adapters.state import inventory_bucket_config
from services.hardware_inventory.domain.fit import dtype_name, predict
from services.hardware_inventory.domain.placement import parse_constraint

__all__ = ["dtype_name", "inventory_bucket_config", "parse_constraint", "predict"]
