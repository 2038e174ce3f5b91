"""`strata model …` and `strata dataset …`: push, list, show, alias, remove, pull and verify models,
and register datasets, through model-store's HTTP API (--url, or STRATA_MODEL_STORE_URL)."""

from __future__ import annotations

import argparse
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from shared.catalog import PublicKey
from shared.errors import StrataError

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser(
        "model", help="models in model-store: push, import, convert, ls, show, alias, rm, pull, verify"
    )
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    push = _cmd(
        msub,
        "push",
        "upload a checkpoint directory (safetensors + config.json), or a .gguf file, as a new version",
        _push,
    )
    push.add_argument("dir", type=Path)
    push.add_argument("--name", required=True)
    push.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="DIGEST",
        help="lineage: a dataset it was trained on (repeatable)",
    )
    push.add_argument("--license")

    ls = _cmd(msub, "ls", "list models and versions", _ls)
    ls.add_argument("name", nargs="?")
    ls.add_argument("--json", action="store_true")

    show = _cmd(msub, "show", "show a model's signed manifest (NAME, NAME:VERSION or NAME@ALIAS)", _show)
    show.add_argument("ref")
    show.add_argument("--json", action="store_true", help="the full manifest and DSSE envelope as JSON")

    alias = _cmd(msub, "alias", "point ALIAS (prod, canary, …) at a version", _alias)
    alias.add_argument("ref")
    alias.add_argument("alias")

    rm = _cmd(msub, "rm", "delete a version (blobs no other manifest uses are garbage-collected)", _rm)
    rm.add_argument("ref")
    rm.add_argument("--all", action="store_true", help="with a bare NAME: delete every version")

    pull = _cmd(msub, "pull", "download a model into DIR, checking its signature and every digest", _pull)
    pull.add_argument("ref")
    pull.add_argument("dir", type=Path)
    pull.add_argument("--key", type=Path, help="trusted public key (PEM or the JSON of /v1/public-key)")

    verify = _cmd(msub, "verify", "check the signature and every stored blob of a model", _verify)
    verify.add_argument("ref")
    verify.add_argument("--key", type=Path, help="trusted public key (PEM or the JSON of /v1/public-key)")

    from cli.model_provenance import register as register_provenance

    register_provenance(msub, _cmd)  # import, convert

    dataset = sub.add_parser("dataset", help="datasets in model-store: add, ls, show")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    add = _cmd(dsub, "add", "register a file or directory as a dataset", _dataset_add)
    add.add_argument("path", type=Path)
    add.add_argument("--name", help="default: the file or directory name")
    add.add_argument("--license")
    add.add_argument("--source", help="where it comes from (URL, package, …)")
    add.add_argument("--description")
    _cmd(dsub, "ls", "list datasets", _dataset_ls)
    dshow = _cmd(dsub, "show", "show a dataset (digest or name)", _dataset_show)
    dshow.add_argument("ref")


def _cmd(
    sub: argparse._SubParsersAction, name: str, help: str, func: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("--url", help="model-store HTTP API (default $STRATA_MODEL_STORE_URL or http://127.0.0.1:8002)")
    p.add_argument("--api-key", help="an admin API key for push, alias, rm and dataset add (default $STRATA_API_KEY)")
    p.add_argument(
        "--https-ca",
        type=Path,
        metavar="FILE",
        help="the CA (PEM) of an HTTPS model-store (default $STRATA_HTTP_CA, else DATA_DIR/http/tls/ca.pem)",
    )
    p.set_defaults(func=lambda args: _run(func, args))
    return p


def _text(text: str) -> str:
    """A pusher's text for rich: its [..] as text, its control characters (terminal escapes) escaped."""
    return escape(
        "".join(c.encode("unicode_escape").decode() if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)
    )


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except StrataError as exc:
        err.print(f"[red]error[/red] ({exc.code}): {escape(exc.message)}", highlight=False)  # a message's [..] is text
        return 1


def _client(args: argparse.Namespace):
    from services.model_store.api import StoreClient

    return StoreClient(args.url, api_key=args.api_key, ca=args.https_ca)


@contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _size(path: Path) -> int:
    from services.model_store.api import local_files

    return sum(f.stat().st_size for f in (local_files(path) if path.is_dir() else [path]))


def _push(args: argparse.Namespace) -> int:
    if not (args.dir.is_dir() or (args.dir.is_file() and args.dir.suffix == ".gguf")):
        raise StrataError(f"{args.dir}: not a directory or a .gguf file")
    client = _client(args)
    with _progress(f"push {args.name}", _size(args.dir)) as advance:
        pushed = client.push_model(args.dir, args.name, datasets=args.dataset, license=args.license, progress=advance)
    m = pushed.model
    verb = "registered" if pushed.created else "already registered as"
    out.print(f"{verb} {m.name}:{m.version} {m.digest}", highlight=False)
    for warning in pushed.warnings:  # stored all the same: exit 0
        err.print(f"[yellow]warning[/yellow]: {warning}", highlight=False)
    return 0


def _ls(args: argparse.Namespace) -> int:
    listing = _client(args).list_models(args.name)
    if args.json:
        print(listing.model_dump_json(indent=2))
        return 0
    table = Table("name", "version", "aliases", "architecture", "params", "dtype", "size", "digest", "created")
    for s in listing.models:
        table.add_row(
            s.model.name,
            str(s.model.version),
            ",".join(s.aliases),
            s.architecture,
            _count(s.parameters),
            s.dtype,
            _bytes(s.size),
            s.model.digest[7:19],
            s.created.strftime("%Y-%m-%d %H:%M"),
        )
    _print_table(table)
    return 0


def _show(args: argparse.Namespace) -> int:
    resolved = _client(args).resolve(args.ref)
    if args.json:
        print(resolved.model_dump_json(indent=2))
        return 0
    m, man = resolved.model, resolved.manifest
    out.print(
        f"[bold]{m.name}:{m.version}[/bold]  {m.digest}  aliases: {', '.join(resolved.aliases) or '-'}", highlight=False
    )
    out.print_json(man.metadata.model_dump_json())
    out.print(
        f"license: {_text(man.license or '-')}   created: {man.created.isoformat()}   "
        f"datasets: {', '.join(man.datasets) or '-'}"
    )
    out.print(
        f"training record: {'yes' if man.training_record else 'no'}   "
        f"signed by key {resolved.signature['signatures'][0]['keyid'][:16]}…"
    )
    if src := man.source:  # an import's origin or a conversion's source version
        out.print(
            _text(
                f"source: {src.kind} {src.name} {src.reference}"
                + (f" ({src.derived_from or src.resolved})" if src.derived_from or src.resolved else "")
            ),
            highlight=False,
        )  # the pusher's text: printed as text, not as markup
    for f in man.files:
        out.print(f"  {f.sha256[:12]}  {_bytes(f.size):>10}  {_text(f.path)}", highlight=False)
    return 0


def _alias(args: argparse.Namespace) -> int:
    result = _client(args).set_alias(args.ref, args.alias)
    moved = f" (was {result.previous_version})" if result.previous_version else ""
    out.print(f"{result.model.name}@{result.alias} -> {result.model.version}{moved}", highlight=False)
    return 0


def _rm(args: argparse.Namespace) -> int:
    result = _client(args).delete(args.ref, all_versions=args.all)
    for m in result.deleted:
        out.print(f"deleted {m.name}:{m.version} {m.digest}", highlight=False)
    out.print(f"{len(result.blobs_removed)} unreferenced blob(s) garbage-collected")
    return 0


def _pull(args: argparse.Namespace) -> int:
    client = _client(args)
    resolved = client.resolve(args.ref)
    total = sum(f.size for f in resolved.manifest.files)
    with _progress(f"pull {resolved.model.name}:{resolved.model.version}", total) as advance:
        resolved = client.pull(
            f"{resolved.model.name}:{resolved.model.version}", args.dir, public_key=_key(args), progress=advance
        )
    out.print(
        f"pulled {resolved.model.name}:{resolved.model.version} into {args.dir} "
        f"(signature and {len(resolved.manifest.files)} digests verified)",
        highlight=False,
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from shared.model_fetch import VerificationError

    client = _client(args)
    try:
        resolved = client.resolve(args.ref)
        total = sum(f.size for f in resolved.manifest.files)
        with _progress(f"verify {resolved.model.name}:{resolved.model.version}", total) as advance:
            resolved, problems = client.verify(
                f"{resolved.model.name}:{resolved.model.version}", public_key=_key(args), progress=advance
            )
    except VerificationError as exc:
        err.print(f"[red]FAILED[/red] {exc.message}", highlight=False)
        return 1
    m = resolved.model
    if problems:
        for problem in problems:
            err.print(f"[red]FAILED[/red] {problem}", highlight=False)
        return 1
    out.print(
        f"OK {m.name}:{m.version} {m.digest}: signature valid, {len(resolved.manifest.files)} blobs match",
        highlight=False,
    )
    return 0


def _key(args: argparse.Namespace) -> PublicKey | None:
    if args.key is None:
        return None
    text = args.key.read_text()
    if text.lstrip().startswith("{"):
        return PublicKey.model_validate_json(text)
    from cryptography.hazmat.primitives import serialization

    from shared.dsse import public_key_info

    try:
        return public_key_info(serialization.load_pem_public_key(text.encode()))  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise StrataError(f"{args.key}: not an Ed25519 public key ({exc})") from None


def _dataset_add(args: argparse.Namespace) -> int:
    if not args.path.exists():
        raise StrataError(f"{args.path}: no such file or directory")
    name = args.name or args.path.resolve().name
    with _progress(f"dataset {name}", _size(args.path)) as advance:
        pushed = _client(args).add_dataset(
            args.path, name, license=args.license, source=args.source, description=args.description, progress=advance
        )
    verb = "registered" if pushed.created else "already registered:"
    out.print(f"{verb} dataset {pushed.manifest.name} {pushed.digest}", highlight=False)
    return 0


def _dataset_ls(args: argparse.Namespace) -> int:
    table = Table("name", "digest", "files", "size", "license", "source", "created")
    for d in _client(args).datasets().datasets:
        m = d.manifest
        table.add_row(
            m.name,
            d.digest,
            str(len(m.files)),
            _bytes(sum(f.size for f in m.files)),
            m.license or "-",
            m.source or "-",
            m.created.strftime("%Y-%m-%d %H:%M"),
        )
    _print_table(table)
    return 0


def _dataset_show(args: argparse.Namespace) -> int:
    print(_client(args).dataset(args.ref).model_dump_json(indent=2))
    return 0


def _print_table(table: Table) -> None:
    # piped or captured output gets the whole table rather than columns squeezed into 80 characters
    (out if out.is_terminal else Console(soft_wrap=True, width=200)).print(table)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
