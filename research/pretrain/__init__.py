"""How the project's offline default backbone, ``retune-minilm-phantom``, is built (research tools: never deployed).

- :mod:`research.pretrain.reports` — radiology-style report text (and hard negatives) for phantom cases;
- :mod:`research.pretrain.config` — :class:`~research.pretrain.config.BuildConfig`, the build's one source of defaults;
- :mod:`research.pretrain.data` — phantoms, reports, the sentence bank and frozen MiniLM features for training;
- :mod:`research.pretrain.build` — contrastive pretraining of a small open_clip image tower against the frozen
  MiniLM text tower, and the artifact writer (``retune build-backbone``);
- :mod:`research.pretrain.evaluate` — zero-shot and adaptor AUROC on ``retune simulate``-like phantom hospitals;
- :mod:`research.pretrain.card` — the artifact's MODEL_CARD.md.

Loading the shipped artifact (checksums, assembly into an open_clip directory) is hospital code:
:mod:`shared.artifact`.
"""
