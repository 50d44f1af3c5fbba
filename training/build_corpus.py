"""Build the training corpus for pipeload's built-in models.

The corpus is made only of text that every CPython installation carries offline:

* the ``.py`` sources of the standard library (``sysconfig.get_paths()["stdlib"]``),
  docstrings included, and
* the interactive help texts of ``pydoc_data.topics.topics``.

Choices (see training/README.md for the reasoning):

* ``site-packages`` is excluded (not part of the standard library, machine specific).
* Test suites are excluded: ``test/`` and every ``tests/``, ``test/``, ``idle_test/``
  sub-package (about 19 MB of the 34 MB of ``.py``).  They are dominated by repetitive
  assertion boilerplate and embedded binary/unicode blobs, which would pull a tiny model
  towards ``self.assertEqual`` soup.  The remaining ~10 MB (2.8 M tokens) is enough for
  our ~1 hour CPU budget: the main model sees it ~3.7 times, and repeating data up to
  ~4 epochs costs little (Muennighoff et al., 2023, "Scaling Data-Constrained LMs").
* ``idlelib`` (ordinary GUI application code) and ``lib2to3`` (minus its tests) are kept.
* Generated data files are excluded: the ``encodings`` charmap tables produced by
  ``gencodec.py``, ``_sysconfigdata_*.py`` (machine specific build flags),
  ``html/entities.py`` and ``stringprep.py`` (big literal tables), and
  ``pydoc_data/topics.py`` itself (its *text* is added instead, one document per topic,
  without the Python string escaping).

The held-out split is by document: ``sha256(relative path)`` modulo 100 < ``--heldout-pct``
(default 4) goes to the held-out set.  For help topics the "path" is
``pydoc_data/topics.py::<topic>``.  Paths are visited in sorted order, so the output is
byte-for-byte deterministic for a given Python version.

Output (in ``--out``, default /work/cache/builtin-train/corpus):
  train.jsonl, heldout.jsonl   one {"path": ..., "text": ...} object per line
  manifest.json                sizes, file counts, exclusions, sha256 of each split

Usage:  python training/build_corpus.py [--out DIR] [--heldout-pct 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

DEFAULT_OUT = "/work/cache/builtin-train/corpus"

# Directory names (any depth) whose contents are test suites.
TEST_DIRS = {"test", "tests", "idle_test"}
# Top-level directories that are not the standard library proper.
SKIP_TOP = {"site-packages", "dist-packages", "__pycache__"}
# Individual generated / data-table files (relative posix paths).
SKIP_FILES = {
    "pydoc_data/topics.py",  # replaced by its texts, see help_topic_docs()
    "html/entities.py",
    "stringprep.py",
}


def is_heldout(key: str, pct: int) -> bool:
    """Stable split: sha256 of the relative path, independent of PYTHONHASHSEED."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h % 100 < pct


def skip_reason(rel: str, text: str | None) -> str | None:
    """Why ``rel`` is left out, or None.  With ``text=None`` only path rules apply."""
    parts = rel.split("/")
    if parts[0] in SKIP_TOP:
        return "not stdlib"
    if any(p in TEST_DIRS for p in parts[:-1]):
        return "test suite"
    if rel in SKIP_FILES:
        return "generated/data table"
    if parts[-1].startswith("_sysconfigdata"):
        return "machine specific (generated)"
    if text is not None and parts[0] == "encodings" and "gencodec.py" in text[:400]:
        return "generated charmap table"
    return None


def stdlib_docs(stdlib: Path, excluded: dict[str, list[str]]):
    files = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__",))
        rel_dir = Path(dirpath).relative_to(stdlib)
        if rel_dir.parts and rel_dir.parts[0] in SKIP_TOP:
            dirnames[:] = []
            continue
        for fn in filenames:
            if fn.endswith(".py"):
                files.append((rel_dir / fn).as_posix())
    for rel in sorted(files):
        reason = skip_reason(rel, None)
        if reason:
            excluded.setdefault(reason, []).append(rel)
            continue
        raw = (stdlib / rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            excluded.setdefault("not utf-8", []).append(rel)
            continue
        reason = skip_reason(rel, text)
        if reason:
            excluded.setdefault(reason, []).append(rel)
            continue
        text = text.replace("\r\n", "\n")
        if not text.strip():
            excluded.setdefault("empty", []).append(rel)
            continue
        yield rel, text


def help_topic_docs():
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].replace("\r\n", "\n")
        if text.strip():
            yield f"pydoc_data/topics.py::{key}", text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--heldout-pct", type=int, default=4)
    args = ap.parse_args(argv)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    excluded: dict[str, list[str]] = {}
    stats = {s: {"docs": 0, "bytes": 0, "py_files": 0, "help_topics": 0} for s in ("train", "heldout")}
    hashes = {}
    fh = {s: open(out / f"{s}.jsonl", "w", encoding="utf-8", newline="\n") for s in ("train", "heldout")}
    digests = {s: hashlib.sha256() for s in ("train", "heldout")}
    try:
        sources = [("py_files", stdlib_docs(stdlib, excluded)), ("help_topics", help_topic_docs())]
        for kind, docs in sources:
            for key, text in docs:
                split = "heldout" if is_heldout(key, args.heldout_pct) else "train"
                line = json.dumps({"path": key, "text": text}, ensure_ascii=False) + "\n"
                fh[split].write(line)
                digests[split].update(line.encode("utf-8"))
                st = stats[split]
                st["docs"] += 1
                st[kind] += 1
                st["bytes"] += len(text.encode("utf-8"))
    finally:
        for f in fh.values():
            f.close()
    for s in digests:
        hashes[s] = digests[s].hexdigest()

    manifest = {
        "python": platform.python_version(),
        "stdlib": str(stdlib),
        "heldout_pct": args.heldout_pct,
        "splits": stats,
        "sha256": hashes,
        "excluded_counts": {k: len(v) for k, v in sorted(excluded.items())},
        "excluded": {k: v for k, v in sorted(excluded.items()) if k != "test suite"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for s, st in stats.items():
        print(f"{s:8s} docs={st['docs']:5d} (py={st['py_files']}, help={st['help_topics']}) "
              f"bytes={st['bytes']:,}")
    print("excluded:", manifest["excluded_counts"])
    print("sha256:", hashes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
