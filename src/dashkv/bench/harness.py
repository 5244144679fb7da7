"""What the end-to-end benchmark measures with: the process's resident memory, CPU-bound competitor
processes (a busy machine), and the time spent inside the model's attention function."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

MAX_BUSY = 64  # competitor processes; more is a typo, not a load


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


class PeakRss:
    """Context manager sampling the RSS every ``interval`` seconds; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


# ------------------------------------------------------------------------------ competitor load


def _spin() -> None:  # pragma: no cover - runs in the competitor processes
    """A CPU-bound competitor: an integer loop in pure Python until terminated."""
    x = 0
    try:
        while True:
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: leave without a traceback
        pass


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Competitors:
    """``n`` CPU-bound processes (:func:`_spin`) running for the length of a ``with`` block: a loaded
    machine. They are terminated on exit, also on an error or Ctrl-C, and are daemons, so they do not
    outlive this process either.

    ``record()`` says what ran and how many CPU seconds each competitor got (that they competed).
    """

    def __init__(self, n: int):
        if not isinstance(n, int) or not 0 <= n <= MAX_BUSY:
            raise ValueError(f"busy={n!r} is not allowed; competitor processes from 0 to {MAX_BUSY}")
        self.n = n
        self.processes: list[multiprocessing.Process] = []
        self.cpu_seconds: list[float | None] = []

    def __enter__(self) -> "Competitors":
        # fork: the child runs a pure-Python loop and touches nothing of the parent (spawn would
        # re-import torch in every competitor)
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        try:
            for i in range(self.n):
                process = context.Process(target=_spin, name=f"dashkv-busy-{i}", daemon=True)
                process.start()
                self.processes.append(process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate (then kill, if need be) every competitor; safe to call twice."""
        if self.processes and not self.cpu_seconds:
            self.cpu_seconds = [_cpu_seconds(p.pid) for p in self.processes]
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()

    def record(self) -> dict:
        return {"processes": self.n, "work": "pure-Python integer loop, one process each",
                "cpu_seconds": self.cpu_seconds}  # fmt: skip


# ------------------------------------------------------------------------------- attention timing


class AttentionTimer:
    """Seconds spent in the model's attention function since ``seconds`` was last set to 0."""

    def __init__(self) -> None:
        self.seconds = 0.0


@contextmanager
def timed_attention(model, timer: AttentionTimer) -> Iterator[AttentionTimer]:
    """Run ``model`` with its current attention function timed by ``timer``.

    Registers ``"timed_<name>"`` (through transformers' ``AttentionInterface``, with the mask function
    of ``<name>``, so masks are built exactly as before) as a function that calls the registered
    ``<name>`` and adds its wall time to ``timer.seconds``, sets the model's attention implementation
    to it, and restores ``<name>`` on exit. Inside :func:`dashkv.enable`, ``<name>`` is ``"dashkv"``.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from dashkv.registry import register_attention

    previous = model.config._attn_implementation
    if previous not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        raise ValueError(f"attention implementation {previous!r} is not a registered function; cannot time it")
    inner = ALL_ATTENTION_FUNCTIONS[previous]

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            timer.seconds += time.perf_counter() - start

    name = f"timed_{previous}"
    register_attention(name, timed, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    model.set_attn_implementation(name)
    try:
        yield timer
    finally:
        model.set_attn_implementation(previous)
