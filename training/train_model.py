"""Train pipeload's built-in Llama models on the standard-library corpus.

Subcommands
-----------
``bench``  measure training throughput (tokens/s) of candidate sizes, fp32 vs bf16
           autocast, a few dozen optimizer steps each::

               python training/train_model.py bench --presets main-s main-m main-l --steps 20

``train``  train one preset for a FIXED number of optimizer steps (so the result does not
           depend on how fast or loaded the machine is), then save it with
           ``save_pretrained(safe_serialization=True)`` as float32 together with the
           tokenizer files and evaluate it (held-out perplexity and bits/byte)::

               python training/train_model.py train --preset main --out /work/cache/builtin-train/main

Architecture: ``transformers.LlamaForCausalLM`` (RMSNorm, SwiGLU MLP, rotary position
embeddings), grouped-query attention, tied input/output embeddings, vocabulary 4096 from
training/train_tokenizer.py.

Determinism: ``torch.manual_seed`` for the initialisation; the data order is a pure
function of ``--seed`` and the step number (per epoch: a random window offset and a
permutation of the non-overlapping windows, both from ``numpy.random.default_rng``).
Training uses 2 threads and bf16 autocast by default; CPU kernels are deterministic for a
given thread count, so a rerun on the same machine/torch build gives the same losses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Other jobs share this machine's two cores.  With OpenMP's default spin-waiting, a
# 2-thread step becomes ~3x slower whenever another process takes a core (threads spin
# at every barrier while their partner is descheduled).  Passive waiting removes that
# cliff.  Must be set before torch (libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

CACHE = Path("/work/cache/builtin-train")
DEFAULT_CORPUS = CACHE / "corpus"
DEFAULT_TOKENIZER = CACHE / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    ctx: int = 512
    # training hyper-parameters
    batch: int = 8           # sequences per optimizer step
    steps: int = 1000
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1


PRESETS: dict[str, Preset] = {
    # bench candidates for the main model (vocab 4096, tied embeddings, ctx 512)
    "main-s": Preset(hidden=256, layers=6, heads=8, kv_heads=4, ffn=704),    # ~5.5 M
    "main-m": Preset(hidden=320, layers=8, heads=8, kv_heads=4, ffn=864),    # ~10.4 M
    "main-l": Preset(hidden=384, layers=8, heads=8, kv_heads=4, ffn=1024),   # ~14.3 M
    # bench candidates for the draft model
    "draft-s": Preset(hidden=128, layers=4, heads=4, kv_heads=2, ffn=352),   # ~1.0 M
    "draft-m": Preset(hidden=160, layers=4, heads=4, kv_heads=2, ffn=448),   # ~1.5 M
}
# The two chosen configurations (see training/README.md for the measurements).
# Step counts are fixed so results do not depend on machine speed/load; they were chosen
# from the measured throughput (bf16 autocast, 2 threads, 4096 tokens/step) to take about
# 60 min (main: 1.07-1.5 s/step) and 10-15 min (draft: 0.35-0.5 s/step).
PRESETS["main"] = replace(PRESETS["main-s"], steps=2500, lr=2e-3, warmup=100)   # 10.2 M tokens
PRESETS["draft"] = replace(PRESETS["draft-s"], steps=1500, lr=3e-3, warmup=100)  # 6.1 M tokens


def llama_config(p: Preset, vocab_size: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        intermediate_size=p.ffn,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        head_dim=p.hidden // p.heads,
        hidden_act="silu",
        max_position_embeddings=p.ctx,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        torch_dtype="float32",
    )


def build_model(p: Preset, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = llama_config(p)
    model = LlamaForCausalLM(cfg)
    model.to(torch.float32)
    return model


def n_params(model) -> dict:
    total = sum(t.numel() for t in model.parameters())  # tied weights counted once
    emb = model.get_input_embeddings().weight.numel()
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


# --------------------------------------------------------------------------- data
class Batches:
    """Deterministic batches of (ctx+1)-token windows from a uint16 token stream.

    Epoch e uses offset o_e in [0, ctx) and a permutation of the windows
    stream[o_e + k*ctx : o_e + (k+1)*ctx + 1]; both drawn from default_rng([seed, e]).
    """

    def __init__(self, path: Path, ctx: int, batch: int, seed: int):
        self.data = np.fromfile(path, dtype=np.uint16)
        self.ctx, self.batch, self.seed = ctx, batch, seed
        self.n_windows = (len(self.data) - 1 - ctx) // ctx  # same count for every offset
        self._epoch, self._order, self._offset = None, None, 0

    def _window(self, i: int) -> np.ndarray:
        epoch, k = divmod(i, self.n_windows)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._offset = int(rng.integers(0, self.ctx))
            self._order = rng.permutation(self.n_windows)
            self._epoch = epoch
        start = self._offset + int(self._order[k]) * self.ctx
        return self.data[start:start + self.ctx + 1]

    def get(self, step: int) -> torch.Tensor:
        rows = [self._window(step * self.batch + j) for j in range(self.batch)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


# --------------------------------------------------------------------------- training
def lr_at(step: int, p: Preset, total: int) -> float:
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    t = (step - p.warmup) / max(1, total - p.warmup)
    return p.lr * (p.min_lr_frac + (1 - p.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, p: Preset):
    decay, no_decay = [], []
    for name, t in model.named_parameters():
        (decay if t.dim() >= 2 else no_decay).append(t)  # no decay on RMSNorm gains
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": p.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=p.lr, betas=(0.9, 0.95), eps=1e-8, fused=False, foreach=True)


def loss_of(model, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    inp, tgt = x[:, :-1], x[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=inp).logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), tgt.reshape(-1))


def train_step(model, opt, x, bf16: bool, clip: float = 1.0) -> float:
    loss = loss_of(model, x, bf16)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item()


def cmd_bench(args) -> int:
    torch.set_num_threads(args.threads)
    results = []
    for name in args.presets:
        p = PRESETS[name]
        for bf16 in ([False, True] if args.dtype == "both" else [args.dtype == "bf16"]):
            model = build_model(p, args.seed)
            model.train()
            opt = make_optimizer(model, p)
            data = Batches(Path(args.corpus) / "train.bin", p.ctx, p.batch, args.seed)
            for s in range(args.warmup_steps):
                train_step(model, opt, data.get(s), bf16)
            losses, times = [], []
            for s in range(args.steps):
                t0 = time.perf_counter()
                losses.append(train_step(model, opt, data.get(args.warmup_steps + s), bf16))
                times.append(time.perf_counter() - t0)
            # Other jobs share the cores: the median and the fastest step are more
            # representative of an unloaded machine than the mean.
            med, best = float(np.median(times)), min(times)
            tps = p.batch * p.ctx / med
            r = {"preset": name, "bf16": bf16, **n_params(model), "ctx": p.ctx, "batch": p.batch,
                 "sec_per_step_median": med, "sec_per_step_min": best,
                 "sec_per_step_mean": sum(times) / len(times),
                 "tokens_per_s": tps, "last_loss": losses[-1], "load_avg": os.getloadavg()[0]}
            results.append(r)
            print(f"{name:8s} {'bf16' if bf16 else 'fp32'} params={r['total']/1e6:6.2f}M "
                  f"(non-emb {r['non_embedding']/1e6:5.2f}M) median {med:.3f} s/step "
                  f"(min {best:.3f}, mean {r['sec_per_step_mean']:.3f}) {tps:6.0f} tok/s "
                  f"-> {tps*3600/1e6:5.1f} M tok/h  loss {losses[-1]:.3f}  "
                  f"load {r['load_avg']:.1f}", flush=True)
            del model, opt
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def cmd_train(args) -> int:
    torch.set_num_threads(args.threads)
    base = PRESETS[args.preset]
    overrides = {k: getattr(args, k) for k in ("steps", "lr", "batch", "warmup") if getattr(args, k) is not None}
    p = Preset(**{**asdict(base), **overrides})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out.parent / (out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log) if args.log else work / "train.log"
    logf = open(log_path, "a", buffering=1)

    def log(msg: str):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")

    model = build_model(p, args.seed)
    model.train()
    opt = make_optimizer(model, p)
    data = Batches(Path(args.corpus) / "train.bin", p.ctx, p.batch, args.seed)
    tokens_per_step = p.batch * p.ctx
    info = {"preset": args.preset, "hparams": asdict(p), "seed": args.seed, "bf16": args.bf16,
            "threads": args.threads, "params": n_params(model),
            "train_tokens_in_corpus": int(len(data.data)),
            "tokens_seen": p.steps * tokens_per_step,
            "epochs": p.steps * p.batch / data.n_windows,
            "torch": torch.__version__, "python": platform.python_version()}
    log("config " + json.dumps(info))

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from evaluate import evaluate_stream

    start_step = 0
    ckpt = work / "checkpoint.pt"
    if args.resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start_step = st["step"]
        log(f"resumed from step {start_step}")

    t0 = time.time()
    t_last, run_loss, run_n = t0, 0.0, 0
    history = []
    for step in range(start_step, p.steps):
        lr = lr_at(step, p, p.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = train_step(model, opt, data.get(step), args.bf16)
        if not math.isfinite(loss):
            log(f"non-finite loss at step {step}; abort")
            return 1
        run_loss += loss
        run_n += 1
        if (step + 1) % args.log_every == 0 or step + 1 == p.steps:
            now = time.time()
            tps = run_n * tokens_per_step / (now - t_last)
            avg = run_loss / run_n
            history.append({"step": step + 1, "loss": avg, "lr": lr, "elapsed_s": now - t0})
            eta = (p.steps - step - 1) * (now - t0) / (step + 1 - start_step)
            log(f"step {step + 1:6d}/{p.steps} loss {avg:.4f} lr {lr:.2e} {tps:6.0f} tok/s "
                f"elapsed {(now - t0) / 60:5.1f} min eta {eta / 60:5.1f} min load {os.getloadavg()[0]:.1f}")
            t_last, run_loss, run_n = now, 0.0, 0
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < p.steps:
            # quick held-out check on the first --eval-tokens tokens (fp32, no grad)
            ev = evaluate_stream(model, Path(args.corpus), "heldout", ctx=p.ctx,
                                 max_tokens=args.eval_tokens,
                                 tokenizer_json=Path(args.tokenizer) / "tokenizer.json")
            history.append({"step": step + 1, "heldout_subset_loss": ev["loss"],
                            "heldout_subset_bpb": ev["bits_per_byte"]})
            log(f"step {step + 1:6d} heldout[:{args.eval_tokens}] loss {ev['loss']:.4f} "
                f"ppl {ev['perplexity']:.2f} bpb {ev['bits_per_byte']:.4f}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < p.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
    wall = time.time() - t0
    log(f"training done: {p.steps - start_step} steps in {wall / 60:.1f} min")

    # save float32 weights + tokenizer
    model.eval()
    model.to(torch.float32)
    model.generation_config.bos_token_id = 0
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        src = Path(args.tokenizer) / f
        if src.exists():
            shutil.copy(src, out / f)
    log(f"saved to {out}")

    # held-out evaluation
    ev = {}
    for split in ("heldout", "train"):
        ev[split] = evaluate_stream(model, Path(args.corpus), split, ctx=p.ctx,
                                    max_tokens=None if split == "heldout" else 150_000,
                                    tokenizer_json=out / "tokenizer.json")
        log(f"eval {split}: " + json.dumps(ev[split]))
    losses = [h["loss"] for h in history if "loss" in h][-5:]
    final_train_loss = sum(losses) / len(losses) if losses else None
    summary = {**info, "wall_time_s": wall, "final_train_loss": final_train_loss,
               "final_train_loss_note": f"mean of the last {len(losses)} logged "
                                        f"{args.log_every}-step averages",
               "eval": ev, "history": history}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if ckpt.exists():
        ckpt.unlink()
    log("summary written")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="measure tokens/s of candidate sizes")
    b.add_argument("--presets", nargs="+", default=["main-s", "main-m", "main-l"])
    b.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--warmup-steps", type=int, default=3)
    b.add_argument("--json")

    t = sub.add_parser("train", help="train one preset for a fixed number of steps")
    t.add_argument("--preset", required=True, choices=sorted(PRESETS))
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch", type=int)
    t.add_argument("--warmup", type=int)
    t.add_argument("--no-bf16", dest="bf16", action="store_false")
    t.add_argument("--log")
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--ckpt-every", type=int, default=250)
    t.add_argument("--eval-every", type=int, default=0,
                   help="every N steps, evaluate on the first --eval-tokens held-out tokens")
    t.add_argument("--eval-tokens", type=int, default=40_000)
    t.add_argument("--resume", action="store_true", help="continue from <out>.work/checkpoint.pt")
    t.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))

    for s in (b, t):
        s.add_argument("--corpus", default=str(DEFAULT_CORPUS))
        s.add_argument("--seed", type=int, default=1234)
        s.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    return cmd_bench(args) if args.cmd == "bench" else cmd_train(args)


if __name__ == "__main__":
    sys.exit(main())
