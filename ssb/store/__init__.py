"""The sparse teacher store (docs/SPEC.md section 5): :mod:`~ssb.store.format` (shards, manifest, writer, reader),
:mod:`~ssb.store.check` (what a directory holds: complete, resumable, to repair, foreign),
:mod:`~ssb.store.compat` (tokenizer/model hashes), :mod:`~ssb.store.pairing` (student views, c_T at the training T)
and :mod:`~ssb.store.inspect` (summaries)."""

from ssb.store.check import StoreCheck, check_store
from ssb.store.compat import StoreMismatchError, chat_template_hash, check_compatible, tokenizer_hash
from ssb.store.format import StoreError, StoreExample, StoreWriter, TeacherStore
from ssb.store.inspect import print_inspect, summarize
from ssb.store.pairing import DistillExample, build_student_examples, lse_for

__all__ = [
    "DistillExample",
    "StoreCheck",
    "StoreError",
    "StoreExample",
    "StoreMismatchError",
    "StoreWriter",
    "TeacherStore",
    "build_student_examples",
    "chat_template_hash",
    "check_compatible",
    "check_store",
    "lse_for",
    "print_inspect",
    "summarize",
    "tokenizer_hash",
]
