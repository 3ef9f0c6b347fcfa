"""Training components the configs compose: one iteration, evaluation, metric and saver per engine
(:mod:`.tokenizer`, :mod:`.transformer`, :mod:`.ddpm`), the handlers MONAI lacks (:mod:`.handlers`)
and shared helpers (:mod:`.common`)."""
