"""`strata ledger ...`, `strata receipt ...`, `strata lineage ...`, `strata audit ...`: the
provenance ledger from the command line. Most commands ask the running ledger over NATS RPC;
`strata receipt verify` needs nothing but the receipt and the public key, and `strata ledger
verify --data-dir` checks a ledger's files with no service running."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

from cli import runner
from shared.config import DEFAULT_DATA_DIR
from shared.contracts import RpcOp
from shared.contracts import provenance_ledger as ledger_ops

SERVICE = "provenance-ledger"


def register(sub: argparse._SubParsersAction) -> None:
    ledger = sub.add_parser("ledger", help="the provenance ledger: verify, head, export, public key, rebuild")
    lsub = ledger.add_subparsers(dest="ledger_command", required=True, metavar="LEDGER_COMMAND")

    verify = lsub.add_parser("verify", help="recompute the Merkle tree from storage and check every signed head")
    verify.add_argument("--data-dir", type=Path, help="check this data dir's ledger files directly (no service needed)")
    _with_nats(verify, data_dir=False)
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=lambda a: _verify_files(a) if a.data_dir is not None else _nats(a, _verify))

    head = _with_nats(lsub.add_parser("head", help="the current tree size and root, and the latest signed tree head"))
    head.add_argument("--sign", action="store_true", help="sign a fresh tree head now")
    head.add_argument("--json", action="store_true")
    head.set_defaults(func=lambda a: _nats(a, _head))

    export = _with_nats(
        lsub.add_parser("export", help="a model's provenance as in-toto/SLSA or a CycloneDX 1.6 ML-BOM")
    )
    export.add_argument("ref", help="NAME, NAME:VERSION, NAME@ALIAS or a manifest digest")
    export.add_argument("--format", choices=["in-toto", "cyclonedx"], default="in-toto")
    export.set_defaults(func=lambda a: _nats(a, _export))

    key = _with_nats(
        lsub.add_parser("public-key", help="print the ledger's public key (PEM): strata ledger public-key > ledger.pub")
    )
    key.set_defaults(func=lambda a: _nats(a, _public_key))

    rebuild = lsub.add_parser(
        "rebuild", help="set the ledger's file aside so the next start replays the EVENTS stream into a new one"
    )
    rebuild.add_argument("--data-dir", type=Path, default=Path(os.environ.get("STRATA_DATA_DIR", DEFAULT_DATA_DIR)))
    rebuild.set_defaults(func=_rebuild)

    receipt = _with_nats(
        sub.add_parser(
            "receipt", help="strata receipt REQUEST_ID > receipt.json | strata receipt verify FILE --key ledger.pub"
        )
    )
    receipt.add_argument("args", nargs="+", metavar="REQUEST_ID | verify FILE")
    receipt.add_argument("--key", type=Path, help="the ledger's public key (PEM), for verify")
    prompt = receipt.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt", help="verify: also check that the receipt commits to this completion prompt (needs --salt)"
    )
    prompt.add_argument(
        "--prompt-file", type=Path, help="verify: the same, the prompt read from a file (UTF-8, exactly as sent)"
    )
    prompt.add_argument(
        "--messages-file",
        type=Path,
        help="verify: the same for a chat: a JSON list of {role, content} messages, or the chat request body "
        "(its messages and tools)",
    )
    receipt.add_argument("--salt", help="verify: the x-strata-prompt-salt your request's reply carried")
    receipt.set_defaults(func=_receipt)

    lineage = _with_nats(
        sub.add_parser(
            "lineage", help="from an answer to its model, datasets, deployment, node and device (or --dataset D)"
        )
    )
    lineage.add_argument("request_id", nargs="?")
    lineage.add_argument(
        "--dataset", help="list the models trained on this dataset digest and the inferences they served"
    )
    lineage.add_argument(
        "--model", help="a model version's origin (import source, or what it was converted from) and its derivatives"
    )
    lineage.add_argument("--json", action="store_true")
    lineage.set_defaults(func=_lineage)

    audit = _with_nats(sub.add_parser("audit", help="the ledger's events for a model since a time"))
    audit.add_argument("--since", help="ISO time or an age like 15m, 2h, 7d")
    audit.add_argument("--model", help="NAME, NAME:VERSION, NAME@ALIAS or a manifest digest")
    audit.add_argument("--type", help="only this event type, e.g. inference.completed")
    audit.add_argument("--limit", type=int, default=1000)
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=lambda a: _nats(a, _audit))


def _with_nats(p: argparse.ArgumentParser, *, data_dir: bool = True) -> argparse.ArgumentParser:
    return runner.add_options(p, timeout=30.0, waits_for="the ledger's answer", data_dir=data_dir)


def _nats(args: argparse.Namespace, command: runner.Command) -> int:
    # `ledger verify --data-dir` never gets here: that data dir is the ledger's files, read directly
    return runner.run(args, command, error_line=_error_line, allow_reconnect=False)


def _error_line(exc: Any, connected: bool = True) -> str:
    return f"strata: {exc.code}: {exc.message}"


async def _call(nc: Any, args: argparse.Namespace, op: RpcOp, **fields: Any) -> Any:
    return await runner.call(nc, op, timeout=args.timeout, **fields)


def _fail(message: str) -> int:
    print(f"strata: {message}", file=sys.stderr)
    return 1


def _errors_to_exit(func: Any) -> Any:
    """For the commands that need no NATS (their files are here): an error is the same line as run's."""

    def wrapper(args: argparse.Namespace) -> int:
        from shared import errors

        try:
            return func(args)
        except errors.StrataError as exc:
            print(_error_line(exc), file=sys.stderr)
            return 1

    wrapper.__name__ = func.__name__
    return wrapper


def _print_json(obj: Any) -> None:
    runner.print_json(obj, sort_keys=True)


@_errors_to_exit
def _verify_files(args: argparse.Namespace) -> int:
    from services.provenance_ledger.api import verify_store

    return _report(args, verify_store(args.data_dir / SERVICE))


async def _verify(nc: Any, args: argparse.Namespace) -> int:
    return _report(args, await _call(nc, args, ledger_ops.VERIFY))


def _report(args: argparse.Namespace, report: Any) -> int:
    if args.json:
        _print_json(report.model_dump())
    else:
        print(
            f"{report.leaves} leaves, {report.heads_checked} signed heads checked "
            f"(latest signed size {report.latest_signed_size})"
        )
        for p in report.problems:
            print(f"  leaf {p.index}: {p.kind}: {p.detail}")
        if report.problems_total > len(report.problems):
            print(f"  ... and {report.problems_total - len(report.problems)} more problems")
        print(
            "OK: the log matches every signed tree head"
            if report.ok
            else f"TAMPERED: {report.problems_total} problem(s)"
        )
    return 0 if report.ok else 2


async def _head(nc: Any, args: argparse.Namespace) -> int:
    if args.sign:
        await _call(nc, args, ledger_ops.CHECKPOINT)
    head = await _call(nc, args, ledger_ops.HEAD)
    if args.json:
        _print_json(head.model_dump(mode="json"))
        return 0
    print(f"tree size {head.tree_size}  root {head.root_hash}")
    if head.signed:
        s = head.signed
        print(f"signed: size {s.tree_size}  root {s.root_hash}  at {s.signed_at.isoformat()}  key {s.key_id}")
    else:
        print("signed: none yet")
    return 0


async def _export(nc: Any, args: argparse.Namespace) -> int:
    _print_json(await _call(nc, args, ledger_ops.EXPORT, ref=args.ref, format=args.format))
    return 0


async def _public_key(nc: Any, args: argparse.Namespace) -> int:
    print((await _call(nc, args, ledger_ops.PUBLIC_KEY)).pem, end="")
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from services.provenance_ledger.api import DB_FILE

    db = args.data_dir / SERVICE / DB_FILE
    if not db.exists():
        return _fail(f"no ledger at {db}")
    aside = db.with_name(f"{DB_FILE}.{time.strftime('%Y%m%dT%H%M%S')}.bak")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{db}{suffix}")
        if src.exists():
            src.rename(Path(f"{aside}{suffix}"))
    print(
        f"moved {db} to {aside}; stop and start the ledger (strata serve provenance-ledger) "
        "to replay the EVENTS stream into a new log"
    )
    return 0


@_errors_to_exit
def _receipt(args: argparse.Namespace) -> int:
    if args.args[0] == "verify":
        if len(args.args) != 2 or args.key is None:
            return _fail("usage: strata receipt verify FILE --key ledger.pub")
        return _verify_receipt(Path(args.args[1]), args.key, args)
    if len(args.args) != 1:
        return _fail("usage: strata receipt REQUEST_ID")
    return _nats(args, _fetch_receipt)


async def _fetch_receipt(nc: Any, args: argparse.Namespace) -> int:
    receipt = await _call(nc, args, ledger_ops.RECEIPT, request_id=args.args[0])
    print(receipt.model_dump_json(indent=2))
    return 0


def _verify_receipt(path: Path, key: Path, args: argparse.Namespace) -> int:
    from services.provenance_ledger.api import ReceiptInvalid, verify_receipt

    try:
        receipt = json.loads(path.read_text())
        prompt = _prompt_to_check(args)
        check = verify_receipt(receipt, key.read_bytes(), prompt=prompt, salt=args.salt)
    except (OSError, json.JSONDecodeError) as exc:
        return _fail(f"cannot read {exc}")
    except ReceiptInvalid as exc:
        print(f"INVALID: {exc}")
        return 2
    except (
        ValueError
    ) as exc:  # a messages file that is not a list of {role, content} (ReceiptInvalid is answered above)
        return _fail(str(exc))
    print(
        f"OK: request {check.request_id} is leaf {check.leaf_index} of the signed tree of size {check.tree_size} "
        f"(key {check.key_id})"
        + ("; the prompt matches its commitment" if check.prompt_checked else "")
    )
    return 0


def _prompt_to_check(args: argparse.Namespace) -> bytes | None:
    from shared.prompt_commitment import prompt_bytes

    if args.prompt is not None:
        return prompt_bytes(prompt=args.prompt)
    if args.prompt_file is not None:
        return prompt_bytes(prompt=args.prompt_file.read_text(encoding="utf-8"))
    if args.messages_file is not None:
        return _chat_prompt_bytes(args.messages_file)
    return None


def _chat_prompt_bytes(path: Path) -> bytes:
    """What the worker committed to for a chat, from the request body as sent (or its messages alone):
    read through the gateway's own request model, so developer roles, content parts, tool calls and
    tools (unless tool_choice is none) count exactly as the worker counted them."""
    from pydantic import ValidationError

    from services.api_gateway.api import ChatCompletionRequest

    data = json.loads(path.read_text(encoding="utf-8"))
    body = {"messages": data} if isinstance(data, list) else data
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise ValueError(f"{path}: expected a JSON list of {{\"role\", \"content\"}} messages, or a chat request body")
    fields = {k: body[k] for k in ("messages", "tools", "tool_choice") if k in body}
    try:
        request = ChatCompletionRequest.model_validate({"model": "receipt", **fields})
    except ValidationError as exc:
        raise ValueError(f"{path}: not a chat request's messages: {exc.errors()[0]['msg']}") from None
    return request.to_inference("receipt").prompt_bytes()


def _lineage(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.request_id, args.dataset, args.model)) != 1:
        return _fail("give a REQUEST_ID, --dataset DIGEST or --model REF")
    return _nats(args, _model_lineage if args.model else _dataset_lineage if args.dataset else _request_lineage)


async def _dataset_lineage(nc: Any, args: argparse.Namespace) -> int:
    result = await _call(nc, args, ledger_ops.DATASET_LINEAGE, digest=args.dataset)
    if args.json:
        _print_json(result)
        return 0
    ds = result["dataset"]
    print(
        f"dataset {ds['name'] or '?'} {ds['digest']}"
        + ("" if ds["in_ledger"] else " (its dataset.registered is not in the ledger)")
    )
    for m in result["models"]:
        print(f"  model {m.get('name')}:{m.get('version')} {m['digest']}  {len(m['inferences'])} inference(s)")
        for i in m["inferences"]:
            print(f"    {i['time']}  request {i['request_id']}  leaf {i['leaf_index']}  {i['node_id']}/{i['device']}")
    return 0


async def _request_lineage(nc: Any, args: argparse.Namespace) -> int:
    r = await _call(nc, args, ledger_ops.LINEAGE, request_id=args.request_id)
    if args.json:
        _print_json(r)
        return 0
    inf, m = r["inference"], r["model"]
    print(
        f"request   {r['request_id']}  (leaf {inf['leaf_index']}, {inf['time']}, "
        f"{inf.get('completion_tokens')} tokens, {inf.get('finish_reason')})"
    )
    print(
        f"model     {m.get('name')}:{m.get('version')}  manifest {m['digest']}"
        + ("" if m["in_ledger"] else "  (model.registered not in the ledger)")
    )
    print(f"training  record {m.get('training_record') or '-'}  architecture {m.get('architecture') or '-'}")
    for ds in m.get("datasets", []):
        print(f"dataset   {ds.get('name') or '?'}  {ds['digest']}  license {ds.get('license') or '-'}")
    print(
        f"deploy    {r['deployment']['deployment_id']}  "
        + ", ".join(f"{e['type']}@{e['leaf_index']}" for e in r["deployment"]["events"])
    )
    dev = r["device"]
    print(
        (
            f"node      {r['node']['node_id']} ({r['node'].get('hostname') or '?'})  "
            f"device {dev['id']} {dev.get('name', '')}"
        ).rstrip()
    )
    return 0


async def _model_lineage(nc: Any, args: argparse.Namespace) -> int:
    result = await _call(nc, args, ledger_ops.MODEL_LINEAGE, ref=args.model)
    if args.json:
        _print_json(result)
        return 0
    for m in result["models"]:
        _print_text(f"model     {m.get('name')}:{m.get('version')}  {m['digest']}  (leaf {m.get('leaf_index')})")
        src = m.get("source")
        if src and src["kind"] != "conversion":
            resolved = f" = {src['resolved']}" if src.get("resolved") else ""
            _print_text(
                f"source    {src['kind']} {src['name']} {src['reference']}{resolved}  "
                f"({len(src['digests'])} digests checked)"
            )
        for parent in m["derived_from"]:
            _print_text(
                f"from      {parent.get('name')}:{parent.get('version')}  {parent['digest']}"
                + ("" if parent["in_ledger"] else "  (not in the ledger)")
            )
        if src and src.get("recipe"):
            _print_text(f"recipe    {src['recipe']}")
        for child in m["derivatives"]:
            _print_text(
                (
                    f"derived   {child.get('name')}:{child.get('version')}  {child['digest']}  "
                    f"{child.get('recipe') or ''}"
                ).rstrip()
            )
    return 0


def _print_text(line: str) -> None:
    """A line of logged text (a pusher's, or whatever was published): control characters escaped, not sent to the
    terminal."""
    print("".join(c.encode("unicode_escape").decode() if unicodedata.category(c) in ("Cc", "Cf") else c for c in line))


async def _audit(nc: Any, args: argparse.Namespace) -> int:
    rows = await _call(
        nc, args, ledger_ops.AUDIT, since=args.since, model=args.model, type=args.type, limit=args.limit,
        reply=list[dict[str, Any]],  # printed as the rows came, not re-serialised
    )
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'LEAF':>7}  {'TIME':<24}  {'TYPE':<26}  {'SOURCE':<18}  SUMMARY")
    for r in rows:
        d = r["data"]
        summary = (
            d.get("request_id")
            or d.get("deployment_id")
            or (d.get("model") or {}).get("digest")
            or d.get("model_ref")
            or ""
        )
        print(f"{r['leaf_index']:>7}  {r['time'][:24]:<24}  {r['type']:<26}  {r['source']:<18}  {summary}")
    print(f"{len(rows)} event(s)")
    return 0
