"""Is a teacher store usable with this tokenizer and model? Hashes recorded at capture, checked before training.

Ids from another tokenizer or chat template would silently misalign the teacher's targets with the student's
sequence, so a mismatch is an error that names what differs.
"""

from __future__ import annotations

import json

from ssb.core.files import sha256_text
from ssb.store.format import StoreError


class StoreMismatchError(StoreError):
    """The store was captured with another tokenizer, chat template or model than the caller uses."""


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) plus the special tokens: equal hash, equal tokenisation table."""
    blob = json.dumps(
        {
            "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
            "specials": sorted(map(str, tokenizer.all_special_tokens)),
            "added": sorted((str(t.content), i) for i, t in tokenizer.added_tokens_decoder.items()),
        },
        ensure_ascii=False,
    )
    return sha256_text(blob)[:16]


def chat_template_hash(tokenizer) -> str:
    template = tokenizer.chat_template
    return sha256_text(json.dumps(template, sort_keys=True))[:16]


def check_compatible(
    manifest: dict, tokenizer, model_name: str | None = None, *, vocab_size: int | None = None
) -> None:
    """Raise :class:`StoreMismatchError` unless ``tokenizer`` (and ``model_name``/``vocab_size``) match the store.

    The trainer calls this before training: ids from another tokenizer or template would silently misalign.
    """
    where = manifest.get("path", "teacher store")
    got = {"tokenizer hash": tokenizer_hash(tokenizer), "chat-template hash": chat_template_hash(tokenizer)}
    want = {
        "tokenizer hash": manifest["tokenizer"]["hash"],
        "chat-template hash": manifest["tokenizer"]["chat_template"],
    }
    if model_name is not None:
        got["model"], want["model"] = model_name, manifest["model"]["id"]
    if vocab_size is not None:
        got["vocab size"], want["vocab size"] = vocab_size, manifest["model"]["vocab_size"]
    for key in got:
        if got[key] != want[key]:
            raise StoreMismatchError(
                f"{where}: {key} mismatch: the store was captured with {want[key]!r}, the trainer uses {got[key]!r}; "
                "recapture the store (ssb capture) with the trainer's model and tokenizer"
            )
