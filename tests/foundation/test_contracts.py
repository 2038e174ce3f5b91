"""The house rules the service contracts (shared/contracts) stand on, checked on the source."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from shared.contracts import contracts, resolve
from shared.contracts.subjects_doc import subjects_markdown
from shared.events import EventData

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"
# What a platform subject, stream or bucket name looks like in a string: evt., live., dlq., infer., rpc.,
# $KV.<bucket>, $O.<store>, KV_/OBJ_<bucket>, or a bucket's name (the JetStream API's own $JS. is NATS's).
SUBJECT_LITERAL = re.compile(
    r"^(evt|live|dlq|infer|rpc)\.[\w*>{}%-]|^\$(KV|O)\.|^(KV|OBJ)_|^strata-(catalog|blobs|inventory|"
    r"api-keys|quotas)$"
)
# Folders whose code is not the platform's (tests, and the CLI, which the lead moves onto the contracts next).
SCANNED = ("services", "shared", "bench", "cli")


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_service_imports_another_services_internals():
    found = []
    for path in _python_files("services"):
        own = path.relative_to(SERVICES).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [
                f"{path.relative_to(ROOT)}: {name}"
                for name in names
                if name.startswith("services.") and name.split(".")[1] != own
            ]
    assert found == [], "a service takes what it needs from shared/ (its contracts), never from another service"


# bench/ scripts that measure one of the worker's kernels or code paths head to head, calling or patching
# the module itself: that module is what they measure, as its tests do. Anything else goes through an api.
INTERNALS_MEASURED = {
    "bench/attention_ref.py": {"services.inference_worker.kernels.paged_attention"},
    "bench/cpu_linear.py": {"services.inference_worker.engine.cpu_linear", "services.inference_worker.kernels"},
    "bench/decode_overhead.py": {"services.inference_worker.kernels.paged_attention",
                                 "services.inference_worker.engine.compiled_decode"},
    "bench/engine_dtypes.py": {"services.inference_worker.engine.cpu_linear", "services.inference_worker.engine.quant"},
    "bench/engine_kernels.py": {"services.inference_worker.kernels"},
    "bench/grammar.py": {"services.inference_worker.engine.guided"},
}
API_MODULES = sorted(f"services.{p.parent.name}.api" for p in SERVICES.glob("*/api.py"))


def _service_imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every ``services.*`` module ``path`` imports, with the names it takes from it (a submodule taken
    from a service's package counts as that submodule)."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("services.")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("services."):
            if re.fullmatch(r"services\.\w+", node.module or ""):
                found += [(f"{node.module}.{a.name}", []) for a in node.names]
            else:
                found.append((node.module or "", [a.name for a in node.names]))
    return found


def test_every_service_has_an_api_module_naming_what_it_exports():
    assert len(API_MODULES) == len([p for p in SERVICES.iterdir() if (p / "config.py").exists()])
    for name in API_MODULES:
        api = importlib.import_module(name)
        assert api.__doc__ and all(hasattr(api, n) for n in api.__all__), name


def test_cli_and_bench_take_a_service_only_through_its_api():
    found = []
    for path in _python_files("cli", "bench"):
        where = str(path.relative_to(ROOT))
        for module, names in _service_imports(path):
            if module in API_MODULES:
                exported = importlib.import_module(module).__all__
                found += [f"{where}: {module} exports no {n}" for n in names if n not in exported]
            elif module not in INTERNALS_MEASURED.get(where, set()):
                found.append(f"{where}: {module}")
    assert found == [], "cli/ and bench/ import services.<service>.api (what it lists in __all__) or shared/"


def test_every_declared_handler_and_type_exists():
    for contract in contracts().values():
        for handler in contract.handlers():
            assert callable(resolve(handler)), handler
            assert inspect.iscoroutinefunction(resolve(handler)), f"{handler} is not async"
        for op in contract.rpc:
            assert isinstance(resolve(op.request), type), op.subject


def test_each_op_is_declared_once_and_each_subscription_has_a_subject():
    subjects = [op.subject for c in contracts().values() for op in c.rpc]
    assert len(subjects) == len(set(subjects))
    for contract in contracts().values():
        assert all(s.subject and s.permission for s in contract.subscriptions), contract.service


def test_each_contract_publishes_only_its_own_events():
    for service, contract in contracts().items():
        assert all(cls.PUBLISHER == service for cls in contract.publishes)
    assert {cls for c in contracts().values() for cls in c.publishes} == {
        cls for cls in EventData.registry.values() if cls.PUBLISHER in contracts()
    }


def _string_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):  # an f-string: its literal head ("evt.{x}" starts with "evt.")
            head = node.values[0]
            if isinstance(head, ast.Constant) and isinstance(head.value, str):
                found.append((node.lineno, head.value + "{"))
            for value in node.values:  # its literal parts are walked as constants too: skip them there
                docstrings.add(id(value))
    return found


@pytest.mark.parametrize("folder", SCANNED)
def test_no_subject_stream_or_bucket_literal_outside_shared_subjects(folder):
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for path in _python_files(folder)
        if path != ROOT / "shared" / "subjects.py"
        for line, text in _string_literals(path)
        if SUBJECT_LITERAL.search(text)
    ]
    assert found == [], "take subjects, streams and buckets from shared/subjects.py"


def test_subjects_md_is_current():
    assert (ROOT / "infra" / "SUBJECTS.md").read_text() == subjects_markdown(), (
        "regenerate with: strata subjects > infra/SUBJECTS.md"
    )


def test_subjects_md_names_every_subscription_and_op_with_its_handler():
    text = (ROOT / "infra" / "SUBJECTS.md").read_text()
    for contract in contracts().values():
        for op in contract.rpc:
            assert f"`{op.subject}`" in text and f"`{op.handler}`" in text, op.subject
        for sub in contract.subscriptions:
            assert f"`{sub.handler}`" in text, sub.subject
    assert "`infer.request.{model}`" in text and "`infer.cancel`" in text


def _handler_names(declared) -> list[str]:
    return list(declared.handlers.values()) if hasattr(declared, "handlers") else [declared.handler]


def test_every_declared_consumer_and_subscription_is_registered_once_with_its_declared_handlers(tmp_path):
    """Each service's Service registers, from its contract, every consumer and core subscription that
    names no ``registered_by`` (so the handlers routed to are the contract's), and none that does."""
    from shared.service import load
    from tests.support.helpers import settings_for

    for name, contract in contracts().items():
        service = load(name, settings_for(name, "nats://127.0.0.1:1", tmp_path / name))
        for declared in (*contract.consumes, *contract.subscriptions):
            times = sum(1 for r in service.registered if r == declared)
            if declared.registered_by:
                assert times == 0, f"{name}: {declared} is registered by Service and by {declared.registered_by}"
            else:
                assert times == 1, f"{name}: {declared} declared without registered_by, registered {times} times"


def test_what_registers_itself_names_the_code_that_does_and_that_code_routes_to_the_declared_handler():
    """A ``registered_by`` exists, is documented (why not Service), and hands the messages to the declared
    handler: it calls it, or the handler is a method of its own class (the ledger's ingest loop)."""
    for contract in contracts().values():
        for declared in contract.self_registered():
            registrar = resolve(declared.registered_by)
            assert callable(registrar) and inspect.getdoc(registrar), declared.registered_by
            source = inspect.getsource(registrar)
            for handler in _handler_names(declared):
                owner, _, function = handler.rpartition(".")
                same_class = owner == declared.registered_by.rpartition(".")[0]
                assert same_class or re.search(rf"\b{function}\b", source), (
                    f"{declared.registered_by} does not route to {handler}"
                )
