"""PipelineModel: the Python API (from_pretrained, generate, stream, chat, logits)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .errors import NoTokenizerError
from .quant import ops
from .runtime.engine import Engine, load_engine
from .runtime.memory import PREFETCH_DEPTH
from .runtime.generation import GenerationResponse, GenerationStats, stream_generate
from .runtime.sampling import SamplingParams

# the activations' dtype; weights are computed on as stored either way, except in "reference"
# (float32 activations on every matrix dequantized to float32: the exact path, slow and large)
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "reference": torch.float32}


def builtin_model_path(name: str = "main") -> Path:
    """Path of a model shipped with pipeload ("main", or "draft" for the small sibling)."""
    return Path(__file__).parent / "data" / f"pipeload-{name}.gguf"


class PipelineModel:
    """A model ready to generate. Build it with `PipelineModel.from_pretrained(path, ...)`."""

    def __init__(self, engine: Engine, tokenizer, options: dict[str, Any]):
        self.engine = engine
        self._tokenizer = tokenizer
        self.options = options
        self.stats: dict[str, Any] = {}
        self._encoder_cache = None  # runtime.encode TextEncoder / ImageEncoder, for encoders
        self.draft = None  # runtime.speculative ModelDraft / PromptLookup when speculative decoding is on

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, dtype: str = "auto",
                        memory_limit: str | int | None = None, prefetch_depth: int = PREFETCH_DEPTH, parallel_loading: bool = True,
                        batch_size: int | None = None, ctx: int | None = None, io_mode: str = "auto",
                        threads: int | None = None, device: str = "cpu", cluster: str | None = None, workers: int = 1,
                        parallel: str = "pipeline", cluster_token: str | None = None,
                        expert_policy: str = "lru", draft: str | os.PathLike | None = None,
                        draft_tokens: int | str = "auto", draft_vocab: int | str | None = "auto") -> "PipelineModel":
        """Load a GGUF file or Hugging Face folder (None: the built-in model).

        memory_limit ("2GB", "1536MiB", bytes, "auto" or None) caps everything the process is
        charged for (its memory and the page cache of its reads): what fits stays resident, the
        rest streams from disk; "auto" is the memory available now (and under a memory cgroup's
        limit) less a margin, and is what a model too big for that memory gets when None is given;
        with no `ctx` the budget sizes the KV cache (the plan's notes say how). Streamed layers
        are read `prefetch_depth` groups ahead, with several reads in flight if `parallel_loading`.
        `batch_size` (default 1) and `ctx` size the KV cache the plan reserves;
        for an encoder (BERT, ViT) they are the inputs (default 32) of up to `ctx` tokens that one
        pass over streamed weights serves (see embed / classify).
        With `cluster="HOST:PORT"` the model runs on `workers` worker processes or machines
        (`pipeload worker --join HOST:PORT --model PATH` on each), split by layers
        (parallel="pipeline") or by heads and columns ("tensor"); see pipeload/cluster/. Only
        workers that prove they know `cluster_token` join (default: $PIPELOAD_CLUSTER_TOKEN).
        A mixture of experts whose experts do not all fit reads the routed experts on demand into
        an expert cache evicting by `expert_policy` ("lru" or "lfu"; runtime/experts.py).
        `draft` turns on speculative decoding (runtime/speculative.py) for lone greedy prompts: a
        GGUF file or folder of a small model with the target's vocabulary (loaded first and kept
        resident, so a memory_limit counts it), "builtin" (the built-in model's draft sibling),
        or "prompt-lookup" (n-gram matches in the text, no model); `draft_tokens` is k per target
        pass, or "auto" (adapted from measured acceptance); `draft_vocab` the token ids a draft model
        proposes from (the first n; "auto": 32768 of a vocabulary over 65536, widened when the
        answer needs more; None: all), which makes its output head smaller. Greedy output is the target's alone,
        token for token; sampled output follows its distribution (speculative sampling). Batches
        decode plainly.
        Raises ModelFileError / UnsupportedModelError / MemoryBudgetError (PipeloadError) on bad input.
        """
        from .runtime.memory import parse_size

        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if device != "cpu":
            raise ValueError(f"device {device!r} is not supported: pipeload runs on the CPU")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None:
            torch.set_num_threads(threads)
        if cluster is not None:
            from .cluster.launch import connect_cluster

            if dtype == "reference":
                raise ValueError("dtype 'reference' (weights dequantized to float32) runs on one machine only; "
                                 "use float32 or bfloat16 with a cluster")
            if draft is not None:
                raise ValueError("speculative decoding (draft) with a cluster is not supported yet; "
                                 "leave draft out to run on the cluster")
            engine = connect_cluster(builtin_model_path() if path is None else path, cluster, workers, parallel,
                                     DTYPES[dtype], context=ctx, batch=batch_size or 1, token=cluster_token)
            options = {"dtype": dtype, "batch_size": batch_size, "ctx": ctx, "cluster": cluster, "workers": workers,
                       "parallel": parallel}
            return cls(engine, engine.spec.load_tokenizer(), options)
        from .runtime.speculative import check_draft_tokens, check_draft_vocab

        check_draft_tokens(draft_tokens)
        check_draft_vocab(draft_vocab)
        draft_engine = None
        if draft is not None and str(draft) != "prompt-lookup":
            draft_path = builtin_model_path("draft") if str(draft) == "builtin" else draft
            draft_engine = load_engine(draft_path, DTYPES[dtype], exact=dtype == "reference")  # resident, counted below
        engine = load_engine(builtin_model_path() if path is None else path, DTYPES[dtype],
                             memory_limit=parse_size(memory_limit), context=ctx, batch=batch_size,
                             prefetch_depth=prefetch_depth, parallel_loading=parallel_loading, io_mode=io_mode,
                             expert_policy=expert_policy, exact=dtype == "reference")
        options = {"dtype": dtype, "memory_limit": memory_limit, "prefetch_depth": prefetch_depth,
                   "parallel_loading": parallel_loading, "batch_size": batch_size, "ctx": ctx, "draft": draft,
                   "draft_tokens": draft_tokens, "draft_vocab": draft_vocab}
        model = cls(engine, engine.spec.load_tokenizer(), options)
        if draft is not None:
            from .runtime.speculative import ModelDraft, PromptLookup

            model.draft = (PromptLookup() if draft_engine is None else
                           ModelDraft(draft_engine, engine.args.vocab_size, vocab=draft_vocab))
        return model

    @property
    def plan(self):
        """The memory plan (runtime.planner.Plan) when a memory_limit was given, else None."""
        return self.engine.plan

    def close(self) -> None:
        """Stop the background readers of a streamed model."""
        self.engine.close()
        if getattr(self.draft, "engine", None) is not None:
            self.draft.engine.close()

    # -- introspection -------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The model's tokenizer (encode / decode); raises NoTokenizerError if it has none."""
        if self._tokenizer is None:
            raise NoTokenizerError(f"{self.engine.checkpoint.path} has no tokenizer: use token ids with logits(), "
                                   "or add tokenizer.json to the model folder")
        return self._tokenizer

    @property
    def args(self):
        return self.engine.args

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def size_gb(self) -> float:
        """Bytes of the model's weights on disk, in GB (10^9)."""
        return self.engine.index.total_bytes / 1e9

    def quantize(self, method: str = "q4_k_m", output: str | os.PathLike | None = None, calibration_data=None,
                 **options: Any):
        """Write this model's weights quantized with `method` to the GGUF file `output` (default:
        beside the source, "<name>.<method>.gguf"); returns a quantize.QuantizeReport.

        method: a `pipeload convert --quant` name (round to nearest, e.g. "q4_k_m", "q8_0"), or
        "gptq4" / "gptq4_0" (calibrated GPTQ, see pipeload.quantize) or "rtn4" (gptq4's types,
        round to nearest). calibration_data: None (the built-in corpus), a .txt/.jsonl path, text,
        a list of texts, or token ids. options: n_samples, seq_len, damp (see quantize_model).
        Load the result with PipelineModel.from_pretrained(report.path)."""
        from .quantize import quantize_model

        src = self.engine.checkpoint.path
        if output is None:
            output = (src if src.is_dir() else src.parent) / f"{src.stem}.{method}.gguf"
        return quantize_model(src, output, method=method, calibration_data=calibration_data,
                              tokenizer=self._tokenizer, **options)

    def perplexity(self, text: str, ctx: int | None = None, stride: int | None = None,
                   max_tokens: int | None = None):
        """Perplexity and bits per byte on `text` (sliding window, see pipeload.perplexity);
        returns a perplexity.PerplexityResult."""
        from .perplexity import perplexity

        return perplexity(self.engine, self.tokenizer, text, ctx=ctx, stride=stride, max_tokens=max_tokens)

    # -- encoders (BERT, ViT) ------------------------------------------------------------------

    @property
    def is_encoder(self) -> bool:
        """An encoder (BERT family, ViT): it embeds (and classifies images); it does not generate."""
        return self.engine.spec.is_encoder

    @property
    def capabilities(self) -> list[str]:
        """What this model can do: "completion" and "chat" (decoders; chat with a chat template),
        "embeddings" (text encoders), "image_embeddings" and "classification" (ViT; classification
        with a classifier head)."""
        from .runtime.encode import capabilities

        chat = self._tokenizer is not None and bool(self._tokenizer.chat_template)
        return capabilities(self.engine.spec.arch, self.args, chat)

    def embed(self, inputs, batch_size: int = 32, truncate: bool = True, normalize: bool | None = None) -> torch.Tensor:
        """Vectors (N, D) float32 for a text or list of texts (BERT family: pooled and normalised
        as the model's sentence-transformers configuration says; `normalize` overrides), or for
        an image or list of images (ViT: paths, bytes or PIL images; the CLS token's final state).

        Texts longer than the model takes are cut with a warning (truncate=False: ContextLengthError).
        Raises ValueError for an empty list, an empty text, or something that is not an image;
        UnsupportedModelError for a decoder. Figures of the call are in `stats`."""
        encoder = self._encoder("embed")
        if hasattr(encoder, "tokenizer"):
            out, stats = encoder.embed(inputs, batch_size=batch_size, truncate=truncate, normalize=normalize)
        else:
            out, stats = encoder.embed(inputs, batch_size=batch_size)
        self.stats = self._encode_figures(stats)
        return out

    def classify(self, images, top_k: int = 5, batch_size: int = 32) -> list[list[tuple[str, float]]]:
        """For each image (a path, bytes or PIL image, or a list of them) its `top_k` most likely
        (label, probability) pairs, labels from the model's id2label. Raises ValueError for a
        non-image or a model without a classifier head, UnsupportedModelError for text models."""
        encoder = self._encoder("classify")
        if not hasattr(encoder, "classify"):
            from .errors import UnsupportedModelError

            raise UnsupportedModelError(f"{self.engine.checkpoint.path} is a text encoder: it embeds text, it does "
                                        "not classify images")
        single = not isinstance(images, (list, tuple))
        out, stats = encoder.classify(images, top_k=top_k, batch_size=batch_size)
        self.stats = self._encode_figures(stats)
        return out[0] if single else out

    def _encoder(self, what: str):
        """The TextEncoder / ImageEncoder of this model (built on first use)."""
        if not self.is_encoder:
            from .errors import UnsupportedModelError

            raise UnsupportedModelError(f"{self.engine.checkpoint.path} is a {self.engine.checkpoint.architecture} "
                                        f"decoder: {what} needs an encoder (BERT family or ViT)")
        if self._encoder_cache is None:
            from .runtime.encode import encoder_for

            self._encoder_cache = encoder_for(self.engine, self._tokenizer)
        return self._encoder_cache

    def _encode_figures(self, stats) -> dict[str, Any]:
        figures = stats.as_dict()
        stream = self.engine.stream_stats
        if stream is not None:
            figures["stream"] = stream.as_dict()
        if self.engine.plan is not None:
            figures["plan"] = self.engine.plan
        return figures

    def _require_decoder(self, what: str) -> None:
        if self.is_encoder:
            from .errors import UnsupportedModelError

            raise UnsupportedModelError(f"{self.engine.checkpoint.path} is an encoder "
                                        f"({self.engine.checkpoint.architecture}): it cannot {what}; use embed()"
                                        + (" or classify()" if "classification" in self.capabilities else ""))

    # -- computing -----------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits (T, V) for every position of one sequence, or (B, T, V) for a (B, T) batch."""
        self._require_decoder("compute next-token logits")
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        single = ids.dim() == 1
        ids = ids[None] if single else ids
        if ids.numel() == 0:
            raise ValueError("logits() needs at least one token")
        bad = (ids < 0) | (ids >= self.args.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary (0..{self.args.vocab_size - 1})")
        if ids.shape[1] > self.context_length:
            from .errors import ContextLengthError

            raise ContextLengthError(f"{ids.shape[1]} tokens exceed the model's context of {self.context_length}")
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        # beyond one prefill chunk the later chunks attend to the earlier ones' keys: a KV cache
        # holds them (dropped on return); within one chunk no cache is needed
        chunked = ids.shape[1] > self.engine.executor.prefill_chunk
        cache = self.engine.new_cache(ids.shape[0], ids.shape[1]) if chunked else None
        out = self.engine.executor.forward(ids, positions, cache=cache)
        return out[0] if single else out

    def _sampling(self, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                  seed=None) -> SamplingParams:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed)

    def stream(self, prompt: str | Sequence[int] | list, max_tokens: int = 256, stop: Sequence[str] | str = (),
               **sampling: Any) -> Iterator[GenerationResponse]:
        """Yield GenerationResponse objects (text delta, token, finish reason, running figures).

        `prompt` is a string, a list of token ids, or a list of those (a batch)."""
        self._require_decoder("generate text")
        prompts = self._as_batch(prompt)
        stats = GenerationStats()
        self.stats = {}
        stop = [stop] if isinstance(stop, str) else list(stop)
        ignore_eos = sampling.pop("ignore_eos", False)
        sampling.pop("batch_size", None)  # batching follows the number of prompts
        params = self._sampling(**sampling)
        plan = self.engine.plan
        if plan is not None and len(prompts) > plan.batch:
            raise ValueError(f"{len(prompts)} prompts exceed the batch of {plan.batch} the memory plan reserved; "
                             f"load with batch_size={len(prompts)} (or pass fewer prompts)")
        stream_stats = self.engine.stream_stats
        read_before = stream_stats.bytes_read if stream_stats is not None else 0
        calls_before = ops.kernel_calls()
        try:
            yield from stream_generate(self.engine, self._tokenizer, prompts, params, max_tokens, stop, stats,
                                       ignore_eos=ignore_eos, draft=self.draft,
                                       draft_tokens=self.options.get("draft_tokens", "auto"))
        finally:
            self.stats = self._figures(stats, read_before, calls_before)
            if self.draft is not None and stats.draft is None:
                self.stats["speculative"] = "off: a batch of prompts decodes plainly, the same tokens as without a draft"

    def _figures(self, stats: GenerationStats, read_before: int, calls_before: dict) -> dict[str, Any]:
        figures = stats.as_dict()
        figures["kernels"] = ops.describe_kernels(calls_before)  # this process's products (not a cluster's workers)
        stream = self.engine.stream_stats
        if stream is not None:
            figures["bytes_read"] = stream.bytes_read - read_before
            figures["stream"] = stream.as_dict()
        experts = getattr(self.engine, "expert_cache", None)
        if experts is not None:  # a mixture of experts reading routed experts on demand (runtime/experts.py)
            figures["experts"] = experts.stats.as_dict()
        if self.engine.plan is not None:
            figures["plan"] = self.engine.plan
        if self.engine.executor.profile:
            figures["layer_seconds"] = list(self.engine.executor.layer_seconds)
        return figures

    def generate(self, prompt: str | list, max_tokens: int = 256, stop: Sequence[str] | str = (),
                 **sampling: Any) -> str | list[str]:
        """The generated text (a list of texts for a list of prompts)."""
        texts = [""] * len(self._as_batch(prompt))
        for r in self.stream(prompt, max_tokens=max_tokens, stop=stop, **sampling):
            texts[r.sequence] += r.text
        return texts if self._is_batch(prompt) else texts[0]

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 256, stream: bool = False, **sampling: Any):
        """Reply to a conversation using the model's chat template (text, or a stream of responses)."""
        self._require_decoder("chat")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        responses = self.stream(ids, max_tokens=max_tokens, **sampling)
        return responses if stream else "".join(r.text for r in responses)

    @staticmethod
    def _is_batch(prompt) -> bool:
        return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int)

    def _as_batch(self, prompt) -> list:
        if self._is_batch(prompt):
            return list(prompt)
        return [prompt]
