"""Running stages together: the one stage registry and ``rounds=R`` expansion (:mod:`~ssb.run.plan`), ``run.json``
and stage-level resume (:mod:`~ssb.run.runner`), round students (:mod:`~ssb.run.rounds`) and ``ssb demo``
(:mod:`~ssb.run.demo`)."""
