"""monitor's public surface for use in another process's own code: bench/ and other tools import these
names, never the modules behind them (tests/foundation/test_contracts.py checks it).

In-process, for benchmarks (bench/monitor_windows.py): the fleet's state (``FleetState``) fed events, its
request ``Traffic`` windows, the ``AlertEngine`` over the rules ``load_rules`` reads (``MonitorConfig``
names the file), and the dashboard's ``snapshot`` of it all.
"""

from services.monitor.adapters.rules_file import load_rules
from services.monitor.config import MonitorConfig
from services.monitor.domain.alerts import AlertEngine
from services.monitor.domain.state import FleetState
from services.monitor.domain.traffic import Traffic
from services.monitor.service_layer.views import snapshot

__all__ = ["AlertEngine", "FleetState", "MonitorConfig", "Traffic", "load_rules", "snapshot"]
