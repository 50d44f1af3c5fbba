"""The worker's lane for an encoder (text embeddings): what a scheduler lane is for a decoder.

Its thread takes every embeddings request waiting in its inbox, refuses the ones that are bad on
their own (an empty text, one longer than the model takes), embeds the texts of all the others in
one PipelineModel.embed call (under a memory budget one pass over the streamed weights serves
them all), and sends each request its vectors:

    ("accepted", rid, {"prompt_tokens"}) / ("rejected", rid, error)
    ("embedded", [{"id", "vectors" (float32 bytes), "dim", "prompt_tokens"}, ...], stats)

Vectors of a request batched with others equal its lone run's within float32 rounding (matrix
products over other row counts round differently), as for sentence-transformers' batches.
"""

from __future__ import annotations

import queue
import threading
import time

from ..errors import ContextLengthError, PipeloadError


class EncoderLane:
    """One thread embedding the requests of an encoder model in batches."""

    def __init__(self, worker, max_batch: int):
        self.worker, self.max_batch = worker, max_batch
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.load = 0  # requests given to this lane and not yet answered (under worker.lock)
        self.error: BaseException | None = None
        self.counters = {"finished": 0, "inputs": 0, "calls": 0}
        self.last_batch, self.last_step_seconds, self.waiting = 0, 0.0, 0
        self.thread = threading.Thread(target=self._run, name="pipeload-encoder-lane", daemon=True)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001  (handed to the main thread, which ends the worker)
            self.error = e

    def _loop(self) -> None:
        while True:
            msg = self.inbox.get()
            batch = []
            while True:
                if msg[0] == "stop":
                    if batch:
                        self._embed(batch)
                    return
                if msg[0] == "submit":
                    batch.append(msg)
                try:
                    msg = self.inbox.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._embed(batch)

    def _embed(self, batch: list[tuple]) -> None:
        from ..encoding.text import check_texts, tokenize

        encoder = self.worker.model._encoder("embed")
        good = []
        for _, rid, payload, _kind in batch:
            try:
                texts = check_texts(payload["input"])
                ids = tokenize(encoder.tokenizer, texts, encoder.max_tokens, truncate=False,
                               lowercase=encoder.sentence.lowercase)
            except ContextLengthError as e:
                self._refuse(rid, 400, str(e), "context_length_exceeded")
                continue
            except (PipeloadError, ValueError, TypeError) as e:
                self._refuse(rid, 400, str(e), None)
                continue
            good.append((rid, texts, sum(map(len, ids))))
            self.worker.send(("accepted", rid, {"prompt_tokens": good[-1][2]}))
        if not good:
            return
        texts = [t for _, ts, _ in good for t in ts]
        t0 = time.perf_counter()
        vectors = self.worker.model.embed(texts, batch_size=self.max_batch, truncate=False)  # (N, D) float32
        self.last_step_seconds, self.last_batch = time.perf_counter() - t0, len(texts)
        out, start = [], 0
        for rid, ts, tokens in good:
            part = vectors[start:start + len(ts)].contiguous().numpy().astype("<f4")
            start += len(ts)
            out.append({"id": rid, "vectors": part.tobytes(), "dim": part.shape[1], "prompt_tokens": tokens})
        self.counters["finished"] += len(good)
        self.counters["inputs"] += len(texts)
        self.counters["calls"] += 1
        self.worker.finished(self, [rid for rid, _, _ in good])
        self.worker.send(("embedded", out, self.worker.stats()))

    def _refuse(self, rid: str, status: int, message: str, code: str | None) -> None:
        self.worker.finished(self, [rid])
        self.worker.send(("rejected", rid, {"status": status, "message": message, "param": "input", "code": code}))
