"""The worker process of one model: load it, run its scheduler, talk to the server over a pipe.

Messages are tuples sent with `multiprocessing.Connection`:

server -> worker                          worker -> server
("submit", rid, payload)                  ("hello", {"pid", "rss"})          before loading
("cancel", rid)                           ("ready", info) / ("load_error", message)
("stop",)                                 ("accepted", rid, {"prompt_tokens"}) / ("rejected", rid, error)
                                          ("events", [event, ...], stats)    one per pass
                                          ("stats", stats)                   after control messages

The worker ignores SIGINT: Ctrl-C in a terminal reaches the whole process group, and the server
(which drains in-flight requests first) decides when workers stop. It exits when told to, or when
the server's end of the pipe closes.
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from ..errors import ContextLengthError, NoTokenizerError, PipeloadError


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"status": status, "message": message, "param": param, "code": code}


class Worker:
    """Serves one loaded model: turns submit payloads into scheduler Requests and events into messages."""

    def __init__(self, conn: Connection, model, options: dict[str, Any]):
        from ..runtime.scheduler import Scheduler

        self.conn, self.model = conn, model
        self.tokenizer = model._tokenizer
        self.scheduler = Scheduler(model.engine, self.tokenizer, max_batch=options["max_batch"],
                                   max_len=options.get("max_len"), exact=options.get("exact", True))

    def info(self) -> dict[str, Any]:
        """What the server shows about this model once it is loaded."""
        from ..runtime.memory import current_rss, peak_rss

        tok = self.tokenizer
        return {"pid": os.getpid(), "context_length": self.scheduler.max_len, "vocab_size": self.model.args.vocab_size,
                "has_tokenizer": tok is not None, "has_chat_template": tok is not None and bool(tok.chat_template),
                "weights_bytes": self.model.engine.index.total_bytes, "kv_cache_bytes": self.scheduler.cache.nbytes,
                "max_batch": self.scheduler.max_batch, "exact": self.scheduler.exact,
                "streamed_groups": len(self.model.plan.streamed) if self.model.plan is not None else 0,
                "rss": current_rss(), "peak_rss": peak_rss()}

    def stats(self) -> dict[str, Any]:
        from ..runtime.memory import current_rss, peak_rss

        s = self.scheduler
        return {"active": len(s.active), "waiting": len(s.waiting), "last_batch": s.last_batch,
                "step_seconds": s.last_step_seconds, "rss": current_rss(), "peak_rss": peak_rss(),
                **s.counters}

    def run(self) -> None:
        """Serve until told to stop or the server goes away (its end of the pipe closes)."""
        try:
            self._loop()
        except (BrokenPipeError, ConnectionResetError):  # the server is gone: nobody to answer
            return

    def _loop(self) -> None:
        while True:
            timeout = 0 if self.scheduler.busy else None  # block while idle
            handled = False
            while self.conn.poll(timeout):
                try:
                    msg = self.conn.recv()
                except EOFError:
                    return
                if msg[0] == "stop":
                    return
                self.handle(msg)
                handled, timeout = True, 0
            if handled:
                self.conn.send(("stats", self.stats()))
            if self.scheduler.busy:
                events = self.scheduler.step()
                self.conn.send(("events", [self.encode(e) for e in events], self.stats()))

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "submit":
            _, rid, payload = msg
            try:
                req = self.request(rid, payload)
                self.scheduler.submit(req)
            except ContextLengthError as e:
                self.conn.send(("rejected", rid, _error(400, str(e), "messages" if payload["kind"] == "chat"
                                                         else "prompt", "context_length_exceeded")))
            except (PipeloadError, ValueError, TypeError) as e:
                self.conn.send(("rejected", rid, _error(400, str(e))))
            else:
                self.conn.send(("accepted", rid, {"prompt_tokens": len(req.prompt)}))
        elif kind == "cancel":
            self.scheduler.cancel(msg[1])
        else:
            raise ValueError(f"worker got an unknown message {kind!r}")

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


def _cluster_options(cluster: dict | None) -> dict[str, Any]:
    """from_pretrained arguments that put the model on a cluster (pipeload serve --cluster)."""
    if not cluster:
        return {}
    return {"cluster": cluster["address"], "workers": cluster["workers"], "parallel": cluster["parallel"]}


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
