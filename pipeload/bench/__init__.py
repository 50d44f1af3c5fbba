"""`pipeload bench SECTION`: benchmarks that print every speed beside its physical bound and beside
the peers, measured side by side in one run. Each section is a module here exporting
`add_arguments(parser)` and `run(args) -> int`; results go to --out as JSON, markdown and plots.
"""

SECTIONS = {
    "streaming": "models larger than memory under a budget, against llama.cpp's mmap and HF transformers",
    "compute": "prompt and generation speed against llama.cpp on the same GGUF files",
    "quality": "perplexity and KL divergence of each quantization method on held-out text",
    "serving": "throughput and latency of pipeload serve with concurrent clients",
    "cluster": "pipeline and tensor parallel over several processes or network namespaces",
    "api_fuzz": "schemathesis against pipeload serve's OpenAPI document: no 5xx, no hang, answers as documented",
}
