"""pipeload against llama.cpp on the real models, live: the quality half of issue 13's table.

For each GGUF given (default: the three decoders of `../shared/models/fetch.sh DEST all`), both
engines run on the same file and the same token ids (llama.cpp through llama-cpp-python, with the
settings of scripts/record_llama_cpp_reference.py; pipeload with its defaults):

- tokenization of the fixed corpus identical (pieces equal / pieces);
- per-position top-1 agreement and perplexity on the fixed scoring text;
- the first 16 greedy tokens of three chat answers equal, or where they first differ and
  llama.cpp's own top-two margin there (a near-tie is below 0.1).

Prints a markdown table. Speed is measured apart, in fresh processes, by
`pipeload bench compute --models ...`.

    python scripts/real_model_report.py [--models DIR] [FILE ...]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import pipeload  # noqa: F401  (before torch: it sets OpenMP's wait policy)
import torch

sys.path.insert(0, str(Path(__file__).parent))
import record_llama_cpp_reference as reference  # noqa: E402

DECODERS = ["smollm2-135m-instruct-q4_1.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"]


def compare(path: Path) -> dict:
    from pipeload import PipelineModel

    theirs = reference.record(path)                       # llama.cpp, live
    model = PipelineModel.from_pretrained(path)
    try:
        pieces = sum(model.tokenizer.encode(case["text"], add_special_tokens=False) == case["ids"]
                     for case in theirs["tokenization"])
        ids = theirs["scoring"]["ids"]
        logp = torch.log_softmax(model.logits(ids)[:-1].double(), dim=-1)
        nll = -logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        agreement = (logp.argmax(-1) == torch.tensor(theirs["scoring"]["argmax"])).double().mean().item()
        chats = []
        for chat in theirs["chats"]:
            ours = [r.token for r in model.stream(chat["prompt_ids"], max_tokens=len(chat["greedy"]))
                    if r.token is not None]
            differ = next((i for i, (a, b) in enumerate(zip(ours, chat["greedy"])) if a != b), None)
            margins = [min(a, b) for a, b in zip(chat["top2_margin"], chat["top2_margin_one_pass"])]
            if differ is not None:
                chats.append(f"differ at {differ} (llama.cpp margin {min(margins[:differ + 1]):.3f})")
            elif len(ours) != len(chat["greedy"]):  # one engine ended the answer (EOS) before the other
                chats.append(f"equal, but {len(ours)} tokens where llama.cpp has {len(chat['greedy'])}")
            else:
                chats.append("equal")
    finally:
        model.close()
    return {"model": path.name, "pieces": f"{pieces}/{len(theirs['tokenization'])}", "agreement": agreement,
            "ppl": math.exp(nll.mean().item()), "ppl_llama": theirs["scoring"]["perplexity"],
            "scored": len(ids) - 1, "chats": chats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="GGUF files (default: the three real decoders in --models)")
    parser.add_argument("--models", default=os.environ.get("PIPELOAD_MODELS")
                        or str(Path.home() / ".cache" / "pipeload" / "models"))
    args = parser.parse_args()
    files = [Path(f) for f in args.files] or [Path(args.models) / name for name in DECODERS]
    print("| model | tokenization identical | top-1 agreement | perplexity pipeload | llama.cpp | ratio | "
          "greedy chat answers (16 tokens) |")
    print("|---|---|---|---|---|---|---|")
    for path in files:
        r = compare(path)
        print(f"| {r['model']} | {r['pieces']} | {r['agreement']:.4f} ({r['scored']} tokens) | {r['ppl']:.4f} | "
              f"{r['ppl_llama']:.4f} | {r['ppl'] / r['ppl_llama']:.4f} | {'; '.join(r['chats'])} |", flush=True)


if __name__ == "__main__":
    main()
