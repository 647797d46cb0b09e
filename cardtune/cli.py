"""The ``cardtune`` command.

Each sub-command imports what it needs inside its handler, so ``cardtune list`` stays fast
(no torch, no transformers).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from cardtune.registry import CardError, InputFileError, UnknownModelError

Handler = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], Handler]
_COMMANDS: dict[str, tuple[str, Configure]] = {}


def command(name: str, help: str) -> Callable[[Configure], Configure]:
    """Register a sub-command: ``configure(parser)`` adds its arguments and returns its handler."""

    def wrap(configure: Configure) -> Configure:
        _COMMANDS[name] = (help, configure)
        return configure

    return wrap


def add_cards_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cards",
        action="append",
        default=[],
        metavar="DIR",
        help="an extra folder of model cards (repeatable; also $CARDTUNE_CARDS, a path list)",
    )


# -- train (the same as train.py) -----------------------------------------------------------
def _run_train(argv: Sequence[str]) -> int:
    from cardtune.train import main as train_main

    return train_main(list(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cardtune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import cardtune.commands  # noqa: F401  (each module registers its sub-commands)

    for name, (help_text, configure) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add_cards_arg(sp)
        sp.set_defaults(handler=configure(sp))
    sub.add_parser("train", help="finetune a model (the same as `python train.py`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return _run_train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from cardtune.quiet import plain_cardtune_warnings

    plain_cardtune_warnings()
    from cardtune.chat.render_limit import RenderTimeout
    from cardtune.collators.roles import TemplateProbeError

    try:
        return args.handler(args)
    except (CardError, UnknownModelError, InputFileError, TemplateProbeError, RenderTimeout) as exc:
        print(f"cardtune {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `cardtune labels ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    # Run as ``python -m cardtune.cli``: sub-commands register on the imported module, not __main__.
    from cardtune.cli import main as _main

    raise SystemExit(_main())
