"""The worker process of one model: load it, run its scheduler, talk to the server over a pipe.

Messages are tuples sent with `multiprocessing.Connection`:

server -> worker                          worker -> server
("submit", rid, payload)                  ("hello", {"pid", "rss"})          before loading
("cancel", rid)                           ("ready", info) / ("load_error", message)
("stop",)                                 ("accepted", rid, {"prompt_tokens"}) / ("rejected", rid, error)
                                          ("events", [event, ...], stats)    one per pass
                                          ("embedded", [result, ...], stats) encoders (encoder_lane.py)
                                          ("stats", stats)                   after control messages

The worker ignores SIGINT: Ctrl-C in a terminal reaches the whole process group, and the server
(which drains in-flight requests first) decides when workers stop. It exits when told to, or when
the server's end of the pipe closes.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from ..errors import ContextLengthError, NoTokenizerError, PipeloadError


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"status": status, "message": message, "param": param, "code": code}


class Lane:
    """One scheduler (its own KV cache and batch) driven by its own thread. A model on a
    pipeline cluster gets one lane per stage, so that as many micro-batches are in flight as
    there are stages and every stage works at once; other models get one lane."""

    def __init__(self, worker: "Worker", scheduler, index: int):
        self.worker, self.scheduler = worker, scheduler
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.load = 0  # requests given to this lane and not yet finished (under worker.lock)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"pipeload-lane-{index}", daemon=True)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001  (handed to the main thread, which ends the worker)
            self.error = e

    def _loop(self) -> None:
        s = self.scheduler
        while True:
            handled = False
            try:
                msg = self.inbox.get(block=not s.busy)
                while True:
                    if msg[0] == "stop":
                        return
                    self._apply(msg)
                    handled = True
                    msg = self.inbox.get_nowait()
            except queue.Empty:
                pass
            if handled:
                self.worker.send(("stats", self.worker.stats()))
            if s.busy:
                events = s.step()
                self.worker.finished(self, [e.request_id for e in events if e.finish_reason is not None])
                self.worker.send(("events", [self.worker.encode(e) for e in events], self.worker.stats()))

    def _apply(self, msg: tuple) -> None:
        if msg[0] == "submit":
            _, rid, req, kind = msg
            try:
                self.scheduler.submit(req)
            except ContextLengthError as e:
                self.worker.finished(self, [rid])
                self.worker.send(("rejected", rid, _error(400, str(e), "messages" if kind == "chat" else "prompt",
                                                          "context_length_exceeded")))
            except (PipeloadError, ValueError, TypeError) as e:
                self.worker.finished(self, [rid])
                self.worker.send(("rejected", rid, _error(400, str(e))))
            else:
                self.worker.send(("accepted", rid, {"prompt_tokens": len(req.prompt)}))
        elif msg[0] == "cancel":
            if self.scheduler.cancel(msg[1]):
                self.worker.finished(self, [msg[1]])


class Worker:
    """Serves one loaded model: turns submit payloads into scheduler Requests (on the least loaded
    lane) and the lanes' events into messages."""

    def __init__(self, conn: Connection, model, options: dict[str, Any]):
        from ..runtime.scheduler import Scheduler

        self.conn, self.model = conn, model
        self.tokenizer = model._tokenizer
        self.lock = threading.Lock()         # lane loads and request owners
        self.owner: dict[str, Lane] = {}     # request id -> its lane
        self.capabilities = model.capabilities
        if model.is_encoder:  # embeddings, batched by an encoder lane (encoder_lane.py)
            from .encoder_lane import EncoderLane

            self.lanes = [EncoderLane(self, options["max_batch"])]
        else:
            n = max(1, int(options.get("lanes") or getattr(model.engine, "pipeline_depth", 1)))
            per_lane = max(1, -(-options["max_batch"] // n))
            self.lanes = [Lane(self, Scheduler(model.engine, self.tokenizer, max_batch=per_lane,
                                               max_len=options.get("max_len"), exact=options.get("exact", True),
                                               draft=model.draft if n == 1 else None,
                                               draft_tokens=options.get("draft_tokens") or "auto"), k)
                          for k in range(n)]
        self.send_lock = threading.Lock()    # one message on the pipe at a time (lanes send too)

    def info(self) -> dict[str, Any]:
        """What the server shows about this model once it is loaded."""
        from ..runtime.memory import current_rss, peak_rss

        if self.model.is_encoder:
            return {"pid": os.getpid(), "capabilities": self.capabilities,
                    "context_length": self.model.engine.context_length,
                    "weights_bytes": self.model.engine.index.total_bytes, "max_batch": self.lanes[0].max_batch,
                    "lanes": 1, "streamed_groups": len(self.model.plan.streamed) if self.model.plan is not None else 0,
                    "rss": current_rss(), "peak_rss": peak_rss()}
        tok, first = self.tokenizer, self.lanes[0].scheduler
        return {"pid": os.getpid(), "capabilities": self.capabilities, "context_length": first.max_len, "vocab_size": self.model.args.vocab_size,
                "has_tokenizer": tok is not None, "has_chat_template": tok is not None and bool(tok.chat_template),
                "weights_bytes": self.model.engine.index.total_bytes,
                "kv_cache_bytes": sum(lane.scheduler.cache.nbytes for lane in self.lanes),
                "max_batch": sum(lane.scheduler.max_batch for lane in self.lanes), "lanes": len(self.lanes),
                "exact": first.exact,
                "streamed_groups": len(self.model.plan.streamed) if self.model.plan is not None else 0,
                "rss": current_rss(), "peak_rss": peak_rss()}

    def stats(self) -> dict[str, Any]:
        """Counters over all lanes (read without stopping them: figures of the moment)."""
        from ..runtime.memory import current_rss, peak_rss

        if self.model.is_encoder:
            lane = self.lanes[0]
            return {"active": 0, "waiting": lane.load, "last_batch": lane.last_batch,
                    "step_seconds": lane.last_step_seconds, "rss": current_rss(), "peak_rss": peak_rss(),
                    **lane.counters}
        schedulers = [lane.scheduler for lane in self.lanes]
        counters: dict[str, int] = {}
        for s in schedulers:
            for k, v in s.counters.items():
                counters[k] = counters.get(k, 0) + v
        return {"active": sum(len(s.active) for s in schedulers), "waiting": sum(len(s.waiting) for s in schedulers),
                "last_batch": sum(s.last_batch for s in schedulers),
                "step_seconds": max(s.last_step_seconds for s in schedulers), "rss": current_rss(),
                "peak_rss": peak_rss(), **counters}

    def send(self, msg: tuple) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def finished(self, lane: Lane, rids: list[str]) -> None:
        """`lane`'s requests `rids` are done (finished, cancelled or refused)."""
        if rids:
            with self.lock:
                lane.load -= len(rids)
                for rid in rids:
                    self.owner.pop(rid, None)

    def run(self) -> None:
        """Serve until told to stop or the server goes away (its end of the pipe closes)."""
        for lane in self.lanes:
            lane.thread.start()
        try:
            self._loop()
        except (BrokenPipeError, ConnectionResetError, EOFError):  # the server is gone: nobody to answer
            return
        finally:
            for lane in self.lanes:
                lane.inbox.put(("stop",))
            for lane in self.lanes:
                lane.thread.join(5.0)

    def _loop(self) -> None:
        while True:
            for lane in self.lanes:
                if lane.error is not None:
                    raise lane.error
            if not self.conn.poll(0.1):
                continue
            msg = self.conn.recv()
            if msg[0] == "stop":
                return
            self.handle(msg)

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "submit":
            _, rid, payload = msg
            if self.model.is_encoder or payload["kind"] == "embeddings":
                self._submit_embeddings(rid, payload)
                return
            try:
                req = self.request(rid, payload)
            except (PipeloadError, ValueError, TypeError) as e:
                self.send(("rejected", rid, _error(400, str(e))))
                return
            with self.lock:
                lane = min(self.lanes, key=lambda ln: ln.load)
                lane.load += 1
                self.owner[rid] = lane
            lane.inbox.put(("submit", rid, req, payload["kind"]))
        elif kind == "cancel":
            with self.lock:
                lane = self.owner.get(msg[1])
            if lane is not None:
                lane.inbox.put(("cancel", msg[1]))
        else:
            raise ValueError(f"worker got an unknown message {kind!r}")

    def _submit_embeddings(self, rid: str, payload: dict[str, Any]) -> None:
        """An embeddings request to the encoder lane; a refusal for any other pairing of request
        and model (the server checks capabilities first: this is the worker's own guard)."""
        if payload["kind"] != "embeddings" or not self.model.is_encoder:
            what = ("an encoder: it makes embeddings (POST /v1/embeddings)" if self.model.is_encoder
                    else "a decoder: it does not make embeddings")
            self.send(("rejected", rid, _error(400, f"this model is {what}", "model", "model_not_supported")))
            return
        with self.lock:
            lane = self.lanes[0]
            lane.load += 1
            self.owner[rid] = lane
        lane.inbox.put(("submit", rid, payload, payload["kind"]))

    def request(self, rid: str, payload: dict[str, Any]):
        """A scheduler Request from a submit payload; raises ValueError / PipeloadError on bad input."""
        from ..runtime.sampling import SamplingParams
        from ..runtime.scheduler import Request

        tok = self.tokenizer
        if payload["kind"] == "chat":
            if tok is None:
                raise NoTokenizerError("this model has no tokenizer, so it cannot chat: use /v1/completions "
                                       "with token ids")
            ids = tok.encode(tok.apply_chat_template(payload["messages"], add_generation_prompt=True),
                             add_special_tokens=False)
        elif isinstance(payload["prompt"], str):
            if tok is None:
                raise NoTokenizerError("this model has no tokenizer: send the prompt as a list of token ids")
            ids = tok.encode(payload["prompt"])
        else:
            ids = list(payload["prompt"])
        stop_ids = frozenset() if payload.get("ignore_eos") or tok is None else frozenset(tok.eos_token_ids)
        return Request(id=rid, prompt=ids, params=SamplingParams(**payload["sampling"]),
                       max_tokens=payload.get("max_tokens"), stop=tuple(payload.get("stop") or ()),
                       stop_token_ids=stop_ids, logprobs=payload.get("logprobs"))

    def token_info(self, token: int) -> dict[str, Any]:
        """{"id", "token" (text), "bytes"} of one token for logprobs."""
        data = self.tokenizer.token_bytes(token) if self.tokenizer is not None else b""
        return {"id": token, "token": data.decode("utf-8", errors="replace") if data else f"<{token}>",
                "bytes": list(data)}

    def encode(self, e) -> dict[str, Any]:
        out = {"id": e.request_id, "text": e.text, "token": e.token, "finish_reason": e.finish_reason,
               "prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens, "logprobs": None}
        if e.logprob is not None:
            out["logprobs"] = {**self.token_info(e.token), "logprob": e.logprob,
                               "top": [{**self.token_info(t), "logprob": lp} for t, lp in e.top_logprobs]}
        return out


def _draft_options(options: dict[str, Any], path) -> dict[str, Any]:
    """from_pretrained arguments for speculative decoding (pipeload serve --draft); an encoder
    (nothing to draft) is served without."""
    if not options.get("draft"):
        return {}
    from ..runtime.spec import open_model

    if open_model(path).is_encoder:
        return {}
    return {"draft": options["draft"], "draft_tokens": options.get("draft_tokens") or "auto"}


def _cluster_options(cluster: dict | None) -> dict[str, Any]:
    """from_pretrained arguments that put the model on a cluster (pipeload serve --cluster)."""
    if not cluster:
        return {}
    return {"cluster": cluster["address"], "workers": cluster["workers"], "parallel": cluster["parallel"],
            "cluster_token": cluster.get("token")}


def worker_main(conn: Connection, options: dict[str, Any]) -> None:
    """Entry point of a worker process (multiprocessing target): load the model, then serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..runtime.memory import current_rss

    conn.send(("hello", {"pid": os.getpid(), "rss": current_rss()}))
    from ..api import PipelineModel

    try:
        model = PipelineModel.from_pretrained(options["path"], dtype=options.get("dtype") or "auto",
                                              memory_limit=options.get("memory_limit"),
                                              batch_size=options["max_batch"], ctx=options.get("max_len"),
                                              threads=options.get("threads"),
                                              **_draft_options(options, options["path"]),
                                              **_cluster_options(options.get("cluster")))
        worker = Worker(conn, model, options)
    except (PipeloadError, ValueError, OSError) as e:
        conn.send(("load_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", worker.info()))
    try:
        worker.run()
    finally:
        model.close()
    # Nothing is left to flush but stdio; skipping the interpreter's teardown (torch, OpenMP threads)
    # frees the memory at once, which matters when the registry unloads this model to load another.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
