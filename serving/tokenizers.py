"""Tokenizers shared by the models of a replica that have the same tokenizer files (LoRA models of one base
usually do): one copy per (files, thread) instead of one per model, about 10 MB each for a BERT vocabulary.

A fast tokenizer must not be used by two threads at once ("Already borrowed"), so each is shared only among
users on the same thread of the replica: ``role`` names it ("loop": the event loop's request path, "worker": the
generation thread, "tokenizing": the encoder tasks' tokenizing thread). A tokenizer lives as long as a model
uses it (weak references).
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from pathlib import Path

_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
          "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
_cache: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def shared_tokenizer(folder: str | Path, role: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(folder)``, or the same object a model with identical tokenizer files and
    the same ``role`` already loaded."""
    from transformers import AutoTokenizer

    digest = hashlib.sha256()
    for name in _FILES:
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    key = (digest.hexdigest(), role, trust_remote_code)
    with _lock:
        tokenizer = _cache.get(key)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with _lock:
            tokenizer = _cache.setdefault(key, tokenizer)
    return tokenizer
