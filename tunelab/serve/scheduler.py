"""The scheduler: one thread owns the model and runs every request in shared forward passes.

Continuous batching: a request joins the running batch between two steps (its prompt is prefilled
alone, then its KV cache joins the padded batch cache, see models.generation.DecodeBatch), every step
is one forward pass for all rows, and a row leaves as soon as it is done (end token, stop string,
max_tokens) or its client has gone. Each row keeps its own sampling settings and stop conditions.

Adapters: switching a PEFT adapter changes the model for every row, so a batch holds the requests of one
model id. Requests are admitted in arrival order; a request for another adapter at the head of the queue
stops further admissions until the running batch drains, then the scheduler switches. No request waits
behind a busy adapter forever.

The HTTP side talks to a job only through `Job.emit` (text pieces, then the end or an error) and
`Job.cancel`; the queue of waiting requests is capped (`submit` answers 503 beyond it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable

from tunelab.models.generation import DecodeBatch, Sampler
from tunelab.serve.protocol import APIError, holdback

log = logging.getLogger("tunelab.serve")


class Job:
    """One request in the scheduler: prompt ids, token budget, sampling, stop strings, and `emit(kind, value)`,
    the pipe back to its HTTP handler (called on the scheduler thread): ("text", piece)..., then ("end", usage)
    or ("error", None)."""

    def __init__(self, model_id: str, prompt_ids: list[int], max_tokens: int, sampler: Sampler,
                 stops: list[str], emit: Callable[[str, object], None]):  # fmt: skip
        self.model_id, self.prompt_ids, self.max_tokens = model_id, prompt_ids, max_tokens
        self.sampler, self.stops, self.emit = sampler, stops, emit
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.finish_reason: str | None = None
        self.on_finish: Callable[[str], None] = lambda reason: None  # the scheduler counts finish reasons
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The client has gone: the scheduler drops the job before its next step (safe from any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, token: int, tokenizer) -> None:
        """Take one new token: send the text that can no longer change, finish on eos / stop / max_tokens."""
        self.tokens.append(token)
        if token == tokenizer.eos_token_id:
            return self.finish("stop")
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.text = text[: min(cuts)]
            return self.finish("stop")
        self.text = text
        # Hold back what may still become a stop string, and an incomplete UTF-8 character (decoded as U+FFFD).
        partial = len(text) - len(text.rstrip("\ufffd"))
        self._send(len(text) - max(holdback(text, self.stops), partial))
        if len(self.tokens) >= self.max_tokens:
            self.finish("length")

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.emit("text", self.text[self.sent : upto])
            self.sent = upto

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.on_finish(reason)
        self._send(len(self.text))
        usage = {"finish_reason": reason, "prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.tokens)}
        self.emit("end", usage)

    def fail(self) -> None:
        self.finish_reason = "error"
        self.on_finish("error")
        self.emit("error", None)


class Scheduler:
    """The thread that runs the model for every request (see the module docstring)."""

    def __init__(self, served, max_batch: int = 32, max_queue: int = 256):
        self.served, self.max_batch, self.max_queue = served, max_batch, max_queue
        self.pending: deque[Job] = deque()
        self.rows: list[Job] = []  # the running batch, in DecodeBatch's row order
        self.batch: DecodeBatch | None = None
        self.model_id: str | None = None
        self.steps = self.peak = 0  # forward passes over the batch, largest batch: for tests and the bench
        self.finished: Counter[str] = Counter()  # finish reasons so far (stop, length, cancelled, error)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tunelab-scheduler", daemon=True)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._wake:
            if len(self.pending) >= self.max_queue:
                raise APIError(503, f"the server is busy ({len(self.pending)} requests waiting); retry later",
                               code="server_busy")  # fmt: skip
            job.on_finish = self._count
            self.pending.append(job)
            self._wake.notify()

    def idle(self) -> bool:
        return not self.rows and not self.pending

    def _count(self, reason: str) -> None:
        self.finished[reason] += 1

    # ------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        active = None  # the model id the PEFT model is switched to
        with contextlib.ExitStack() as selection:
            while (newcomers := self._next_jobs()) is not None:
                if not newcomers and not self.rows:
                    continue  # only cancelled jobs were waiting
                if self.model_id != active:
                    # Switching walks every module of the model (tens of ms on a 135M model, measured):
                    # only when the batch's model id changes, never per step.
                    selection.close()
                    selection.enter_context(self.served.selected(self.model_id))
                    active = self.model_id
                for job in newcomers:
                    self._admit(job)
                self._retire()
                if self.rows:
                    self._step()
                    self._retire()
        for job in [*self.rows, *self.pending]:  # shutting down
            job.fail()

    def _next_jobs(self) -> list[Job] | None:
        """Wait for work; the waiting jobs of the running model id that fit into the batch (None: stop)."""
        with self._wake:
            while not self.rows and not self.pending and not self._stopping:
                self._wake.wait()
            if self._stopping:
                return None
            for job in [j for j in self.pending if j.cancelled]:  # gone before they started
                self.pending.remove(job)
                job.finish("cancelled")
            if not self.rows and self.pending:
                self.model_id = self.pending[0].model_id
            take, room = [], self.max_batch - len(self.rows)
            while self.pending and self.pending[0].model_id == self.model_id and len(take) < room:
                take.append(self.pending.popleft())
            return take

    def _admit(self, job: Job) -> None:
        try:
            if self.batch is None:
                self.batch = DecodeBatch(self.served.model)
            token = self.batch.add(job.prompt_ids, job.sampler)
        except Exception:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("prefill failed")
            return job.fail()
        self.rows.append(job)
        job.feed(token, self.served.tokenizer)

    def _step(self) -> None:
        try:
            tokens = self.batch.step()
        except Exception:  # noqa: BLE001 - fail this batch, keep serving
            log.exception("decode step failed")
            for job in self.rows:
                job.fail()
            self.rows, self.batch = [], None
            return
        self.steps += 1
        self.peak = max(self.peak, len(self.rows))
        for job, token in zip(self.rows, tokens, strict=True):
            job.feed(token, self.served.tokenizer)

    def _retire(self) -> None:
        """Drop the rows that are done or whose client has gone, in one re-indexing of the cache."""
        for job in self.rows:
            if job.cancelled and not job.done:
                job.finish("cancelled")
        keep = [i for i, job in enumerate(self.rows) if not job.done]
        if len(keep) < len(self.rows):
            self.batch.keep(keep)
            self.rows = [self.rows[i] for i in keep]
