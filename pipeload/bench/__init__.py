"""`pipeload bench SECTION`: benchmarks that print every speed beside its physical bound and beside
the peers, measured side by side in one run. Each section is a module here exporting
`add_arguments(parser)` and `run(args) -> int`; results go to --out as JSON, markdown and plots.
"""

SECTIONS = {
    "streaming": "models larger than memory under a budget, against llama.cpp's mmap and HF transformers",
    "compute": "prompt and generation speed against llama.cpp on the same GGUF files",
    "kernels": "each compiled kernel in GB/s of weight bytes beside the memory bandwidth",
    "quality": "perplexity and KL divergence of each quantization method on held-out text",
    "serving": "throughput and latency of pipeload serve with concurrent clients",
    "cluster": "pipeline and tensor parallel over several processes or network namespaces",
    "encoders": "BERT-base, MiniLM and ViT-B/16 shapes: peak memory (cgroup) and samples/s, resident, under budgets, and transformers",
    "moe": "a mixture of experts larger than memory: expert streaming against llama.cpp's mmap in one memory cgroup",
    "speculative": "greedy decoding plainly, with a draft model and with prompt lookup, per budget (same tokens checked)",
    "api_fuzz": "schemathesis against pipeload serve's OpenAPI document: no 5xx, no hang, answers as documented",
}
