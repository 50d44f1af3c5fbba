"""Tokenizers and chat templates: text <-> token ids for a model, from its own files.

    tokenizer.py   the Tokenizer class (encode, decode, EOS ids, streaming detokenizer) and
                   loading it from a Hugging Face folder (tokenizer.json, tokenizer.model)
    from_gguf.py   the same Tokenizer from GGUF `tokenizer.ggml.*` metadata (llama.cpp's rules)
    chat.py        chat templates (Jinja, sandboxed) rendered as transformers does
"""

from __future__ import annotations


def load_tokenizer(checkpoint):
    """The Tokenizer of a weights.checkpoint.Checkpoint (GGUF metadata or HF folder), or None
    when it ships none; raises ModelFileError for broken tokenizer files."""
    if checkpoint.format == "gguf":
        from .from_gguf import tokenizer_from_gguf

        return tokenizer_from_gguf(checkpoint.config)
    from .tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(checkpoint.path)
