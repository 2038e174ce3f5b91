"""The `strata` command. Each area of the CLI is a module in cli/ with a ``register(subparsers)``
function; it adds its subcommands with ``set_defaults(func=...)``, where func takes the parsed args
and returns the exit code."""

from __future__ import annotations

import argparse
import sys

from cli import infer, inventory, keys, ledger, model, monitor, platform, provision

COMMAND_MODULES = [platform, ledger, model, inventory, infer, monitor, keys, provision]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strata", description="Run LLMs on hardware you own, and prove what ran.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # every option after `train` belongs to the trainer's own parser
        from builtin_model.train import main as train_main

        return train_main(argv[1:]) or 0
    args = parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
