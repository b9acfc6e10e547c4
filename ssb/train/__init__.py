"""``ssb train``: the flat loop (:mod:`~ssb.train.loop`), the student model and loss path (:mod:`~ssb.train.model`),
data stream and packing (:mod:`~ssb.train.data`), checkpoints (:mod:`~ssb.train.ckpt`) and the ``--dry-run``
memory probe (:mod:`~ssb.train.dryrun`)."""

from ssb.train.loop import run, setup, train

__all__ = ["run", "setup", "train"]
