"""The sparse teacher store (docs/SPEC.md section 5): :mod:`~ssb.store.format` (shards, manifest, writer, reader),
:mod:`~ssb.store.compat` (tokenizer/model hashes), :mod:`~ssb.store.pairing` (student views, c_T at the training T)
and :mod:`~ssb.store.inspect` (summaries)."""

from ssb.store.compat import StoreMismatchError, chat_template_hash, check_compatible, tokenizer_hash
from ssb.store.format import StoreError, StoreExample, StoreWriter, TeacherStore, is_complete
from ssb.store.inspect import print_inspect, summarize
from ssb.store.pairing import DistillExample, build_student_examples, lse_for

__all__ = [
    "DistillExample",
    "StoreError",
    "StoreExample",
    "StoreMismatchError",
    "StoreWriter",
    "TeacherStore",
    "build_student_examples",
    "chat_template_hash",
    "check_compatible",
    "is_complete",
    "lse_for",
    "print_inspect",
    "summarize",
    "tokenizer_hash",
]
