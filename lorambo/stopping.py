"""A user's or a cluster's stop (Ctrl-C, SIGTERM) ends a run with one line, its folder released and no result.
SIGTERM, which SLURM sends before it kills a preempted job, waits inside the training loop for the end of the
current step, which is checkpointed when `train.checkpoint_every` is set, so the job resumes from there."""

import signal
from contextlib import contextmanager


class RunStopped(BaseException):
    """A BaseException, as KeyboardInterrupt is: no `except Exception` on the way up may take it for a bug."""

    def __init__(self, how: str, step: int | None = None, steps: int | None = None):
        super().__init__(how)
        self.how, self.step, self.steps = how, step, steps


_requested: list[str] = []  # "SIGTERM" once it arrived while the training loop can stop at a step's end
_in_loop = [False]


def _on_sigterm(signum, frame):
    if _in_loop[0]:
        _requested.append("SIGTERM")
    else:
        raise RunStopped("SIGTERM")


@contextmanager
def stoppable():
    """SIGTERM stops the run here (in the process's main thread; elsewhere signals keep their handlers)."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: Python delivers signals to the main thread only
        yield
        return
    _requested.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stop_at_step_end(progress, steps: int):
    """Inside the training loop a SIGTERM is kept for the loop to read at the end of the step; a Ctrl-C says at
    which step (`progress.step`) it stopped."""
    _in_loop[0] = True
    try:
        yield
    except KeyboardInterrupt:
        raise RunStopped("Ctrl-C", progress.step, steps) from None
    finally:
        _in_loop[0] = False


def stop_requested() -> str | None:
    return _requested[0] if _requested else None


def exit_code(how: str) -> int:
    return 128 + (signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)  # the shell's convention: 143, 130
