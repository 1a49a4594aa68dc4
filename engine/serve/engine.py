"""The inference side of one backbone: a bounded queue, admission into KV cache rows, and one
iteration of batched multi-adapter generation (decode tokens first, then prefill chunks).

Threads: `submit` is called by the HTTP thread; everything else runs on the engine thread,
between training rounds, which is what makes adapter snapshots consistent.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from muxtune.engine.model import families
from muxtune.engine.serve.adapters import AdapterRegistry, Unavailable
from muxtune.engine.serve.forward import InferenceForward, WorkItem
from muxtune.engine.serve.kv_cache import KVPool
from muxtune.engine.serve.request import Delta, Done, Failed, GenerationRequest, IncrementalText
from muxtune.engine.serve import logprobs
from muxtune.engine.serve.sampling import new_generator, sample

log = logging.getLogger("muxtune.serve")


class Overloaded(Exception):
    """Refused at the door: 429 (queue full) or 503 (not serving), with a Retry-After in seconds."""

    def __init__(self, status: int, message: str, retry_after: int):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass
class ServeLimits:
    max_num_seqs: int = 16  # requests generating at once (KV cache rows)
    max_model_len: int = 2048  # prompt + generated tokens of one request (KV cache row length)
    max_queue: int = 64  # requests waiting for a row; more get 429
    max_tokens: int = 1024  # cap on a request's max_tokens
    max_prefill_tokens: int = 512  # prompt tokens per iteration at most (longer prompts are chunked)
    queue_timeout_s: float = 60.0  # a request waiting longer gets 503
    max_queue_wait_s: float = 10.0  # a request the queue ahead would keep waiting longer gets 429 at once


@dataclass
class InferenceStats:
    decode_tokens: int
    prefill_tokens: int
    seconds: float
    finished: int


def model_len(config, limits: ServeLimits) -> int:
    """Tokens of one request at most (a KV cache row): sliding windows do not bound a request, the
    serving attention applies each layer's window."""
    return min(limits.max_model_len, getattr(config, "max_position_embeddings", limits.max_model_len))


class ServeEngine:
    def __init__(self, backbone, registry: AdapterRegistry, limits: ServeLimits, metrics=None):
        families.require(backbone.family, "serve")  # refused naming the family, before any request
        config = backbone.model.config
        max_len = model_len(config, limits)
        self.limits = limits
        self.max_model_len = max_len
        self.backbone = backbone
        self.registry = registry
        self.metrics = metrics
        self.pool = KVPool.for_backbone(backbone, limits.max_num_seqs, max_len)
        self.forward = InferenceForward(backbone, self.pool)
        head = backbone.lm_head.weight.device  # meta on a pipeline stage before the last: logits come to rank 0
        self.logits_device = backbone.device if head.type == "meta" else head
        self.tokenizer = backbone.tokenizer  # engine thread only
        self.eos = backbone.tokenizer.eos_token_id
        self.waiting: deque[GenerationRequest] = deque()
        self.running: list[GenerationRequest] = []
        self.wakeup = threading.Event()
        self._lock = threading.Lock()
        self._closed: str | None = None
        self.shed = 0  # requests refused with 429: beyond what the queue and the finish rate can take
        self._finishes: deque[float] = deque(maxlen=64)  # when recent requests finished (the service rate)
        self.prompt_tokens_mean = 64.0  # running mean prompt length: the prefill an arrival is likely to need
        self._seed = torch.Generator().manual_seed(int(time.time_ns() % 2**62))  # seeds for unseeded requests

    # ----- the HTTP thread -------------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> None:
        self.submit_all([req])

    def submit_all(self, reqs: list[GenerationRequest]) -> None:
        """Queue a request's choices together, or none of them (429 when the queue cannot take all)."""
        with self._lock:
            if self._closed:
                raise Overloaded(503, f"the server is not accepting requests: {self._closed}", 5)
            if len(self.waiting) + len(reqs) > self.limits.max_queue:
                self.shed += len(reqs)
                raise Overloaded(429, f"too many requests waiting ({self.limits.max_queue}); retry later", 1)
            wait = self.expected_wait(len(reqs))
            if wait > self.limits.max_queue_wait_s:
                self.shed += len(reqs)
                raise Overloaded(429, f"over capacity: about {wait:.0f}s of requests ahead (at most "
                                      f"{self.limits.max_queue_wait_s:g}s); retry later", math.ceil(wait))
            self.waiting.extend(reqs)
        self.wakeup.set()

    def expected_wait(self, extra: int = 0) -> float:
        """Seconds until `extra` new requests would get a row: the requests ahead at the recent finish rate."""
        ahead = len(self.waiting) + extra - len(self.pool.free)
        if ahead <= 0 or len(self._finishes) < 8:
            return 0.0
        span = self._finishes[-1] - self._finishes[0]
        return ahead * span / (len(self._finishes) - 1)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # ----- the engine thread -----------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def close(self, reason: str) -> None:
        """Refuse new requests and fail the ones not finished (shutdown)."""
        with self._lock:
            self._closed = reason
            waiting, self.waiting = list(self.waiting), deque()
        for req in waiting + list(self.running):
            self._fail(req, Failed(503, f"the server stopped: {reason}"))

    def step(self, prefill_budget: int | None = None) -> InferenceStats | None:
        """One inference iteration; None when there was nothing to run."""
        self.registry.sync_tasks()
        self._reap()
        self._admit()
        items, reqs, decode = self._plan(prefill_budget or self.limits.max_prefill_tokens)
        if not items:
            return None
        t0 = time.perf_counter()
        try:
            rows = self._rows(items, self.forward(items))
            for it, r, logits in zip(items, reqs, rows):
                if it.all_logits:
                    self._prompt_logprobs(r, it, logits)
            picked = [(r, logits[-1:]) for it, r, logits in zip(items, reqs, rows)
                      if it.sample and r.params.max_tokens > 0]
            last = torch.cat([lg for _, lg in picked]) if picked else None
            tokens = [] if last is None else sample(
                last, [r.params for r, _ in picked], [r.generator for r, _ in picked],
                [(r.prompt_ids, r.output_ids) for r, _ in picked], self.eos)
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the engine
            log.exception("inference forward failed", extra={"requests": len(reqs)})
            for r in set(reqs):
                self._fail(r, Failed(500, f"inference failed: {type(exc).__name__}: {exc}"))
            return InferenceStats(0, 0, time.perf_counter() - t0, 0)
        now = time.monotonic()
        for it, r in zip(items, reqs):
            if not it.sample:
                r.prefilled += len(it.tokens)
            elif r.params.max_tokens == 0:  # echo only: the prompt (and its logprobs) is the answer
                r.prefilled = r.prefix_len
                self._finish(r, "length")
        finished = sum(1 for it, r in zip(items, reqs) if it.sample and r.params.max_tokens == 0)
        for (r, logits), tok in zip(picked, tokens):
            if r.in_prefill:
                r.prefilled = r.prefix_len
            try:
                if r.params.logprobs is not None:
                    r.pending_logprobs += logprobs.entries(logits, [tok], r.params.logprobs)
                finished += self._accept(r, tok, now)
            except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer error fails this request only
                log.exception("request failed", extra={"request": r.id})
                self._fail(r, Failed(500, f"{type(exc).__name__}: {exc}"))
        return InferenceStats(decode, sum(len(it.tokens) for it in items) - decode, time.perf_counter() - t0, finished)

    @staticmethod
    def _rows(items: list[WorkItem], logits: torch.Tensor) -> list[torch.Tensor]:
        """The forward's logits split per item: every token's (all_logits), the last one's, or none."""
        out, at = [], 0
        for it in items:
            n = len(it.tokens) if it.all_logits else int(it.sample)
            out.append(logits[at:at + n])
            at += n
        return out

    @staticmethod
    def _prompt_logprobs(r: GenerationRequest, it: WorkItem, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens this chunk's logits predict: row j predicts cache position
        offset+j+1, prompt token offset+j+1-virtual; the first prompt token has none (as vLLM)."""
        lo, v, n = it.offset, r.virtual, len(r.prompt_ids)
        if lo <= v < lo + len(it.tokens):
            r.prompt_logprobs.append(logprobs.TokenLogprob(r.prompt_ids[0], None, []))
        j0, j1 = max(0, v - lo), min(len(it.tokens), n - 1 + v - lo)
        if j1 > j0:
            targets = r.prompt_ids[lo + j0 + 1 - v:lo + j1 + 1 - v]
            r.prompt_logprobs += logprobs.entries(logits[j0:j1], targets, r.params.prompt_logprobs)

    def _reap(self) -> None:
        now = time.monotonic()
        for r in [r for r in self.running if r.cancelled]:
            self._finish(r, "abort", notify=False)
        with self._lock:
            keep = deque()
            drop = []
            for r in self.waiting:
                if r.cancelled:
                    drop.append((r, None))
                elif now - r.arrival > self.limits.queue_timeout_s:
                    drop.append((r, Failed(503, f"waited {self.limits.queue_timeout_s:.0f}s for a free slot")))
                else:
                    keep.append(r)
            self.waiting = keep
        for r, failure in drop:
            if failure is None:
                r.finish_reason = "abort"
                if self.metrics:
                    self.metrics.finished(r, "abort")
            else:
                self._fail(r, failure)

    def _admit(self) -> None:
        while self.pool.free:
            with self._lock:
                if not self.waiting:
                    return
                r = self.waiting.popleft()
            try:
                r.version = self.registry.acquire(r.model)
            except Unavailable as exc:
                self._fail(r, Failed(404, str(exc), "invalid_request_error"))
                continue
            r.virtual = r.version.virtual_tokens
            if r.prefix_len >= self.max_model_len:  # the adapter's virtual tokens count against the row
                self._fail(r, Failed(400, f"the prompt ({len(r.prompt_ids)} tokens) and the adapter's {r.virtual} "
                                          f"virtual tokens leave no room to generate in {self.max_model_len}",
                                     "invalid_request_error"))
                continue
            r.row = self.pool.allocate()
            r.admitted_at = time.monotonic()
            r.adapter_step = r.version.step
            r.fingerprint = r.version.model if r.version.step is None else f"{r.version.model}@step-{r.version.step}"
            self.prompt_tokens_mean += 0.1 * (len(r.prompt_ids) - self.prompt_tokens_mean)
            r.generator = new_generator(r.params, self.logits_device,
                                        int(torch.randint(2**62, (1,), generator=self._seed)))
            r.text = IncrementalText(self.tokenizer, r.params.stop)
            self.running.append(r)
            if self.metrics:
                self.metrics.admitted(r)

    def _plan(self, prefill_budget: int) -> tuple[list[WorkItem], list[GenerationRequest], int]:
        """Work items (decode first), their requests, and how many are decode tokens."""
        items, reqs = [], []
        for r in self.running:  # decode first: one token for every request past its prompt
            if not r.in_prefill:
                pos = r.prefix_len + len(r.output_ids) - 1
                items.append(WorkItem([r.output_ids[-1]], r.row, pos, r.version.slot, True))
                reqs.append(r)
        decode = len(items)
        left = max(1, prefill_budget)
        for r in sorted((r for r in self.running if r.in_prefill), key=lambda r: r.seq):  # then prompts, FIFO
            if left <= 0:
                break
            n = min(r.prefix_len - r.prefilled, left)
            chunk = r.prefix_tokens(r.prefilled, n)
            items.append(WorkItem(chunk, r.row, r.prefilled, r.version.slot, r.prefilled + n == r.prefix_len,
                                  all_logits=r.params.prompt_logprobs is not None))
            reqs.append(r)
            left -= n
        return items, reqs, decode

    def _accept(self, r: GenerationRequest, token: int, now: float) -> int:
        """Take one sampled token; returns 1 if the request finished."""
        r.output_ids.append(token)
        if r.first_token_at is None:
            r.first_token_at = now
            if self.metrics:
                self.metrics.first_token(r)
        r.last_token_at = now
        if (token == self.eos and not r.params.ignore_eos) or token in r.params.stop_token_ids:
            self._finish(r, "stop")
            return 1
        text, stopped = r.text.push(token)
        if stopped:
            self._delta(r, text)
            self._finish(r, "stop")
            return 1
        if len(r.output_ids) >= r.params.max_tokens or r.prefix_len + len(r.output_ids) >= self.max_model_len:
            self._delta(r, text)
            self._finish(r, "length")
            return 1
        if text or len(r.output_ids) == 1:  # the first token always goes out: clients time TTFT on it
            self._delta(r, text, always=True)
        return 0

    @staticmethod
    def _delta(r: GenerationRequest, text: str, always: bool = False) -> None:
        if text or always:
            r.sink(Delta(text, len(r.output_ids), r.pending_logprobs))
            r.pending_logprobs = []

    def _release(self, r: GenerationRequest) -> None:
        if r in self.running:
            self.running.remove(r)
        if r.row is not None:
            self.pool.release(r.row)
            r.row = None
        if r.version is not None:
            self.registry.release(r.version)
            r.version = None

    def _finish(self, r: GenerationRequest, reason: str, notify: bool = True) -> None:
        self._release(r)
        self._finishes.append(time.monotonic())
        r.finish_reason = reason
        if notify:
            r.sink(Done(reason, r.text.rest() if r.text else "", len(r.prompt_ids), len(r.output_ids),
                        r.pending_logprobs, r.prompt_logprobs if r.params.prompt_logprobs is not None else None))
        if self.metrics:
            self.metrics.finished(r, reason)

    def _fail(self, r: GenerationRequest, failure: Failed) -> None:
        self._release(r)
        r.finish_reason = "error"
        r.sink(failure)
        if self.metrics:
            self.metrics.finished(r, "error")
