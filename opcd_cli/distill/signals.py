"""SIGINT and SIGTERM during a run: inside the loop they ask it to stop after the current step (the state
saved, to continue with ``--resume``); outside it they stop at once, as Ctrl-C does, leaving nothing
half-written."""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the loop: handled where Ctrl-C is (nothing half-written is kept), exit code 143."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises ``Terminated`` instead of killing the process, so that the run is left as Ctrl-C leaves it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(number, frame):
        raise Terminated()

    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopSignals:
    """The signal that asked the loop to stop (SIGINT or SIGTERM), or None."""

    signal: signal.Signals | None = None


@contextlib.contextmanager
def stop_signals():
    """While the loop runs, SIGINT (Ctrl-C) and SIGTERM (what a cluster's preemption sends) only ask it to stop
    after the current step; outside it they act as usual."""
    stop = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def ask(number, frame):
        if stop.signal is not None:  # asked twice: stop now, as outside the loop
            raise Terminated() if number == signal.SIGTERM else KeyboardInterrupt()
        stop.signal = signal.Signals(number)

    # a signal the process was started to ignore (SIGINT in a shell's background job) stays ignored
    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
