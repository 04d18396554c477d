"""How an adapter's command ends on bad input or a host error: one line naming the flag
or the file, never a traceback (exit 2 for a usage error, 1 for the host's)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from ...model.errors import SpecError


def one_line_errors(prog: str, body: Callable[[], int]) -> int:
    """body()'s status; a SpecError or OSError becomes `PROG: message` on stderr."""
    try:
        return body()
    except SpecError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises SpecError naming the flag, instead of printing its usage."""

    def error(self, message: str) -> NoReturn:
        flag, sep, problem = message.partition(": ")
        if sep and flag.startswith("argument "):
            raise SpecError(flag.removeprefix("argument ").split("/")[0], problem)
        raise SpecError("arguments", message)
