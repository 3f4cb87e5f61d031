"""The edge of every command line: a user mistake is one ``error:`` line and exit 2, Ctrl-C is exit 130.

``python -m jaxnorm.sweep``, ``python -m jaxnorm.analyze`` and ``python -m jaxnorm.perceptron_report``
run their ``main`` through :func:`guard`. Below it, code raises ordinary exceptions whose message
names the bad value or file and the allowed ones:

* ``ValueError`` (bad config or argument, malformed data file, ``jaxnorm.rundir.RunDirError``,
  ``tomllib.TOMLDecodeError``, pandas' ``ParserError``);
* ``OSError`` (``jaxnorm.data.DataNotFoundError`` and any file that cannot be read or written; the
  message names the file).

Both are printed as ``error: <message>`` on stderr, exit code 2, no traceback (set
``JAXNORM_TRACEBACK=1`` to get one). ``KeyboardInterrupt`` prints the interrupted message and exits
130 (128 + SIGINT, the shell's convention), as does any exception that follows a Ctrl-C (an interrupt
raised inside a library can surface as another exception). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
TRACEBACK_ENV = "JAXNORM_TRACEBACK"
INTERRUPTED = "interrupted; rerun the same command to resume"


def message(err: BaseException) -> str:
    """One readable message for a user-facing exception; an OSError names its file(s)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        where = repr(os.fspath(err.filename))
        if err.filename2 is not None:
            where += f" -> {os.fspath(err.filename2)!r}"
        # "[Errno 13] Permission denied: 'x'" -> "'x': permission denied"
        return f"{where}: {err.strerror[0].lower()}{err.strerror[1:]}"
    return str(err) or type(err).__name__


@contextlib.contextmanager
def _reliable_sigint(redeliver_s: float = 0.5):
    """Ctrl-C that cannot be lost. A KeyboardInterrupt raised while Python runs a gc callback or a
    finalizer (JAX registers ``_xla_gc_callback``) is printed as "Exception ignored" and dropped, and
    the run went on to exit 0. Here SIGINT raises KeyboardInterrupt and is re-delivered every
    ``redeliver_s`` seconds until the main code has seen it (call the yielded ``seen`` then); a
    dropped one is not printed. Yields ``(seen, received)``: ``received()`` is True once a SIGINT
    has arrived. Off the main thread (no signal handlers there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield (lambda: None), (lambda: False)
        return
    state = {"seen": False, "received": False}

    def redeliver():
        if not state["seen"]:
            os.kill(os.getpid(), signal.SIGINT)

    def on_sigint(signum, frame):
        if state["seen"]:
            return
        state["received"] = True
        t = threading.Timer(redeliver_s, redeliver)
        t.daemon = True
        t.start()
        raise KeyboardInterrupt

    def unraisable(info):
        if not (state["seen"] is False and isinstance(info.exc_value, KeyboardInterrupt)):
            previous_hook(info)

    previous, previous_hook = signal.signal(signal.SIGINT, on_sigint), sys.unraisablehook
    sys.unraisablehook = unraisable
    try:
        yield (lambda: state.update(seen=True)), (lambda: state["received"])
    finally:
        state["seen"] = True
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook


def guard(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
          interrupted: str = INTERRUPTED) -> int:
    """Runs ``main(argv)`` and turns user mistakes and Ctrl-C into one stderr line and an exit code.

    Returns:
      ``main``'s return value (None -> 0); 2 after a ``ValueError``/``OSError``; 130 after Ctrl-C.
      ``SystemExit`` (argparse's own usage errors, exit 2) passes through.
    """
    with _reliable_sigint() as (seen, received):
        try:
            code = main(argv)
        except KeyboardInterrupt:
            seen()
            print(interrupted, file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as err:
            if os.environ.get(TRACEBACK_ENV):
                raise
            if received():
                # A KeyboardInterrupt raised inside a library's bookkeeping can come out as another
                # exception (Flax's trace-state check turns one raised during model.init into an
                # AssertionError): after a Ctrl-C, any exception is the interruption.
                seen()
                print(interrupted, file=sys.stderr)
                return EXIT_INTERRUPTED
            if not isinstance(err, (ValueError, OSError)):
                raise
            print(f"error: {message(err)}", file=sys.stderr)
            return EXIT_USER_ERROR
    return 0 if code is None else int(code)
