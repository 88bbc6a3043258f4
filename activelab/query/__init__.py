"""The query data plane: the context strategies read from (:mod:`.context`) and the engine that runs a
strategy for one round, shared by ``activelab.select`` and the experiment runner (:mod:`.engine`)."""
