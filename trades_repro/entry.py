"""The `trades-repro` executable: the Typer app run so that the exit codes hold everywhere.

Inside a command `cli._user_errors` keeps the contract (0 ok, 1 failed, 2 bad input,
3 inconclusive, 4 our own failure, 141 reader gone). Around the commands click decides
alone, and breaks it in three places that this entry point takes over:

* a usage error (a missing argument, an unknown option or command, `--jobs 0`) is one line
  on stderr with exit 2, not a five-line box;
* `--help` into a closed pipe (`trades-repro --help | head -1`) stops quietly with 141, not 1,
  which would read as "a claim failed";
* a package that fails to import (a broken install) is one line naming a log with the
  traceback, exit 4, not a raw traceback with exit 1.

Ctrl-C outside a command's own handling exits 130, as a shell reports it.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import traceback

EXIT_BAD_INPUT, EXIT_CRASHED = 2, 4
EXIT_INTERRUPTED = 128 + 2  # SIGINT
EXIT_READER_GONE = 128 + 13  # SIGPIPE


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: the process's arguments); returns the exit code."""
    try:
        import typer

        from trades_repro.cli import app

        usage = _click_errors()
    except Exception as err:  # noqa: BLE001 - nothing of ours can run: say so in one line
        return _crashed("could not start", err)
    args = sys.argv[1:] if argv is None else list(argv)
    command = typer.main.get_command(app)
    try:
        with command.make_context("trades-repro", args) as ctx:
            command.invoke(ctx)
    except typer.Exit as done:
        return done.exit_code
    except usage.NoArgsIsHelpError as help_shown:
        help_shown.show()
        return EXIT_BAD_INPUT
    except usage.UsageError as err:
        where = f" (see '{err.ctx.command_path} --help')" if err.ctx else ""
        return _error(f"error: {err.format_message()}{where}", EXIT_BAD_INPUT)
    except usage.ClickException as err:
        return _error(f"error: {err.format_message()}", err.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        return EXIT_INTERRUPTED
    except SystemExit as stop:  # rich's answer to a closed pipe while printing help: exit 1
        code = stop.code if isinstance(stop.code, int) else 1
        if code == 1 and _reader_gone():
            _to_devnull(sys.stdout)
            return EXIT_READER_GONE
        return code
    except OSError as err:
        if err.errno != errno.EPIPE:
            return _crashed("failed unexpectedly", err)
        _to_devnull(sys.stdout)
        return EXIT_READER_GONE
    except Exception as err:  # noqa: BLE001 - outside every command: never exit 0 or 1
        return _crashed("failed unexpectedly", err)
    return 0


def _click_errors():
    """The exception module of the click that Typer runs: its own copy since Typer 0.23."""
    try:
        from typer._click import exceptions
    except ImportError:  # an older Typer on the real click
        from click import exceptions
    return exceptions


def run() -> None:
    """The console script (pyproject's `[project.scripts]`)."""
    sys.exit(main())


def _error(line: str, code: int) -> int:
    """`line` on stderr and `code`; 141 when stderr's reader has left (`2>&1 | true`)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except BrokenPipeError:
        _to_devnull(sys.stderr)
        return EXIT_READER_GONE
    return code


def _crashed(what: str, err: BaseException) -> int:
    handle, log = tempfile.mkstemp(prefix="trades-repro-", suffix=".log")
    with os.fdopen(handle, "w") as out:
        out.write(f"trades-repro {' '.join(sys.argv[1:])}\n")
        traceback.print_exception(err, file=out)
    message = (str(err).strip().splitlines() or [""])[0]
    return _error(f"error: trades-repro {what}: {type(err).__name__}: {message} (traceback in "
                  f"{log})", EXIT_CRASHED)


def _reader_gone() -> bool:
    """Whether stdout's reader left: the pipe flags it, or rich already pointed stdout at
    /dev/null, as its console does on a broken pipe just before it raises SystemExit(1)."""
    from trades_repro.cli import _readers_gone

    try:
        out = sys.stdout.fileno()
        null, now = os.stat(os.devnull), os.fstat(out)
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return False
    return out in _readers_gone() or (now.st_rdev, now.st_ino) == (null.st_rdev, null.st_ino)


def _to_devnull(stream) -> None:
    """The reader left: point `stream` at /dev/null so that the exit-time flush is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


__all__ = ["main", "run"]
