"""Graceful stops: SIGINT/SIGTERM during a stage, and runs stopped for numerical faults.

``stop_on_signal()`` installs handlers for the duration of a stage only (the previous ones are
restored afterwards). The first signal just records a stop request: the stage finishes its current
step, saves what it can and raises ``StageInterrupted``; a second signal stops at once (the default
behaviour: ``KeyboardInterrupt``). The CLI turns ``StageInterrupted`` into a message saying how to
resume and the conventional exit code (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StageInterrupted(BaseException):
    """A stage stopped early on a signal. BaseException, like KeyboardInterrupt: no ``except Exception``
    on the way up may swallow it."""

    def __init__(self, signum: int, stage: str, step: int, checkpoint: Path | None = None):
        self.signum, self.stage, self.step, self.checkpoint = signum, stage, step, checkpoint
        where = f"at step {step}" + (f"; checkpoint saved to {checkpoint}" if checkpoint else "")
        super().__init__(f"the {stage} stage was interrupted by {signal_name(signum)} {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had non-finite values; the message is one line."""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequest:
    """What the handlers recorded: ``signum`` of the first signal, or None."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing the current step, then saving and stopping "
                    "(send it again to stop at once)", signal_name(signum))

    def request_from_peer(self) -> None:
        """Another process of a distributed run got the signal: stop here too."""
        if self.signum is None:
            self.signum = signal.SIGTERM

    def raise_if_requested(self, stage: str, step: int, checkpoint: Path | None = None) -> None:
        if self.signum is not None:
            raise StageInterrupted(self.signum, stage, step, checkpoint)


@contextlib.contextmanager
def stop_on_signal():
    """Record SIGINT/SIGTERM as a stop request while the block runs; restore the old handlers after."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signal.signal only works there
        yield request
        return
    previous = {}
    try:
        for sig in HANDLED_SIGNALS:
            previous[sig] = signal.signal(sig, request._handle)
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class StopOnSignalCallback(TrainerCallback):
    """Stops a Hugging Face / TRL trainer at the end of the current step once a stop was requested."""

    def __init__(self, request: StopRequest):
        self.request = request

    def on_step_end(self, args, state, control, **kwargs):
        if self.request:
            control.should_training_stop = True
        return control
