"""The embedded toy world: :mod:`~ssb.toy.world` (problems with planted misconceptions, its tokenizer),
:mod:`~ssb.toy.pretrain` (the toy model's pretraining), :mod:`~ssb.toy.measure` (bare/hinted accuracy) and
``python -m ssb.toy``. The world sits beside ``ssb.core`` (``ssb.core.data`` serves its splits as a dataset);
pretraining and measuring are tools on the stages' floor."""
