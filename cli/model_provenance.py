"""`strata model import` and `strata model convert`: models that come from somewhere else, pushed through
the one push path (StoreClient.push_model) with their origin (shared/model_source.py) in the signed
manifest and in the ledger's model.registered."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from shared.errors import Invalid

QUANTS = ("f16", "q8_0", "q4_k_m")


def register(msub: argparse._SubParsersAction, cmd) -> None:
    """``cmd``: cli/model.py's subcommand maker (the --url, --api-key and --https-ca options, error handling)."""
    imp = cmd(msub, "import", "import ollama:NAME[:TAG] or hf:ORG/NAME[@REVISION] from this machine's cache, "
                              "with where it came from recorded", _import)
    imp.add_argument("source", metavar="ollama:NAME[:TAG]|hf:ORG/NAME[@REVISION]")
    imp.add_argument("--name", help="the name in model-store (default: the source's name)")
    imp.add_argument("--file", help="hf: the .gguf to import when the repository has several")
    imp.add_argument("--license", help="default: an Ollama license layer's first line")

    conv = cmd(
        msub,
        "convert",
        "convert a version to GGUF (f16, q8_0, q4_k_m): a new signed version with lineage to it",
        _convert,
    )
    conv.add_argument("ref", metavar="NAME[:VERSION|@ALIAS]")
    conv.add_argument("--to", choices=["gguf"], required=True)
    conv.add_argument("--quant", choices=QUANTS, required=True)
    conv.add_argument("--name", help="the result's name (default: the source's name, as a new version)")
    conv.add_argument("--threads", type=int, default=0, help="quantizer threads (default: every core)")


def _import(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from cli.model import _client, _progress, err, out
    from services.model_store.api import read_huggingface, read_ollama

    kind, _, ref = args.source.partition(":")
    if kind not in ("ollama", "hf") or not ref:
        raise Invalid(f"{args.source!r}: expected ollama:NAME[:TAG] or hf:ORG/NAME[@REVISION]")
    if args.file and kind != "hf":
        raise Invalid("--file picks a GGUF of a Hugging Face repository; an Ollama model has one")
    with tempfile.TemporaryDirectory(prefix="strata-import-") as staging:
        plan = read_ollama(ref, Path(staging)) if kind == "ollama" else read_huggingface(ref, args.file)
        name = args.name or plan.name
        client = _client(args)
        with _progress(f"import {name}", sum(f.stat().st_size for f in plan.files)) as advance:
            pushed = client.push_model(
                plan.directory,
                name,
                files=plan.files,
                source=plan.source,
                known_sha256=plan.checked_sha256,
                license=args.license or plan.license,
                progress=advance,
            )
    m = pushed.model
    verb = "imported" if pushed.created else "already imported as"
    out.print(f"{verb} {m.name}:{m.version} {m.digest} from {args.source}", highlight=False)
    for note in [*plan.notes, *pushed.warnings]:
        err.print(f"[yellow]note[/yellow]: {escape(note)}", highlight=False)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from cli.model import _client, _progress, out
    from services.model_store.api import convert_model

    client = _client(args)
    resolved = client.resolve(args.ref)
    with tempfile.TemporaryDirectory(prefix="strata-convert-") as work:
        work_dir = Path(work)
        total = sum(f.size for f in resolved.manifest.files)
        ref = f"{resolved.model.name}:{resolved.model.version}"
        with _progress(f"pull {ref}", total) as advance:
            resolved = client.pull(ref, work_dir / "source", progress=advance)
        result = convert_model(resolved, work_dir / "source", work_dir / "out", args.quant, threads=args.threads)
        name = args.name or resolved.model.name
        size = result.path.stat().st_size
        with _progress(f"push {name}", size) as advance:
            pushed = client.push_model(
                result.path,
                name,
                source=result.source,
                license=resolved.manifest.license,
                datasets=resolved.manifest.datasets,
                progress=advance,
            )
    m = pushed.model
    verb = "converted" if pushed.created else "already converted"
    out.print(
        f"{verb} {ref} -> {m.name}:{m.version} {m.digest} ({result.quantization}, {size} bytes "
        f"in {result.seconds:.2f}s: F16 {result.f16_seconds:.2f}s, quantize {result.quantize_seconds:.2f}s)",
        highlight=False,
    )
    return 0
