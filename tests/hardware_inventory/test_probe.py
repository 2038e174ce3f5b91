"""The probe of this machine (a CPU-only node is valid), scripted probes, and the role settings."""

import json

import pytest

from services.hardware_inventory.service_layer.registry import Registry
from services.hardware_inventory.adapters.probe import StaticProbe, SystemProbe, parse_cpu_model
from shared.host_memory import parse_meminfo
from services.hardware_inventory.config import InventoryConfig
from shared.errors import Invalid


def test_this_machine_probes_as_a_valid_node(tmp_path):
    result = SystemProbe(tmp_path, labels={"zone": "a"}).probe()
    assert result.cpu_cores >= 1 and result.ram_total > result.ram_free > 0
    assert result.disk_total > 0 and result.cpu_model
    devices = result.devices()
    assert devices[0].id == "cpu" and devices[0].memory_total == result.ram_total
    assert all(d.kind == "cuda" for d in devices[1:])  # none on a CPU-only machine, each GPU otherwise
    assert result.labels == {"zone": "a"}


def test_proc_parsers():
    meminfo = (
        "MemTotal:       16318032 kB\nMemFree:         1234 kB\nMemAvailable:    8000000 kB\nHugePages_Total:       0\n"
    )
    assert parse_meminfo(meminfo) == {
        "MemTotal": 16318032 * 1024,
        "MemFree": 1234 * 1024,
        "MemAvailable": 8000000 * 1024,
        "HugePages_Total": 0,
    }
    assert (
        parse_cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
        == "AMD EPYC 9654 96-Core Processor"
    )
    assert parse_cpu_model("") == "unknown CPU"


def test_a_scripted_probe_is_checked_when_it_is_loaded(tmp_path):
    with pytest.raises(Invalid, match="does not exist"):
        StaticProbe(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hostname": "h", "cpu_model": "c", "cpu_cores": 0, "ram_total": 1, "ram_free": 1}))
    with pytest.raises(Invalid, match="cpu_cores"):
        StaticProbe(bad)


def test_roles_and_settings_come_from_the_environment(tmp_path):
    config = InventoryConfig.from_env(
        {
            "STRATA_INVENTORY_ROLES": "agent",
            "STRATA_INVENTORY_HEARTBEAT_S": "0.5",
            "STRATA_INVENTORY_MISSED_BEATS": "4",
            "STRATA_INVENTORY_POLICY": "spread",
            "STRATA_INVENTORY_LABELS": "zone=a,rack=3",
        }
    )
    assert config.roles == {"agent"} and config.heartbeat_interval_s == 0.5 and config.missed_beats == 4
    assert config.policy == "spread" and config.labels == {"zone": "a", "rack": "3"}
    assert InventoryConfig.from_env({}).roles == {"agent", "registry"}
    with pytest.raises(ValueError, match="roles"):
        InventoryConfig.from_env({"STRATA_INVENTORY_ROLES": "agent,scheduler"})


async def test_strata_up_runs_both_roles_in_one_process_and_this_machine_joins(nats_server, tmp_path, monkeypatch):
    from tests.support.helpers import eventually, make_service

    monkeypatch.setenv("STRATA_INVENTORY_HEARTBEAT_S", "0.2")
    monkeypatch.delenv("STRATA_INVENTORY_ROLES", raising=False)
    monkeypatch.delenv("STRATA_INVENTORY_PROBE_FILE", raising=False)
    service = make_service("hardware-inventory", nats_server.url, tmp_path, node_id="this-box")
    async with service.running():
        nodes = service.part(Registry).nodes
        await eventually(
            lambda: "this-box" in nodes.telemetry and nodes.telemetry["this-box"].ram_free > 0, what="a heartbeat"
        )
        [record] = await service.part(Registry).state.nodes()
    assert record.node_id == "this-box" and record.status == "alive" and record.devices[0].kind == "cpu"
    assert record.heartbeat_interval_s == 0.2 and record.ram_total > 0
