"""The project's own offline default backbone, ``retune-minilm-phantom``: build it, ship it, load it.

- :mod:`shared.pretrain.reports` — radiology-style report text (and hard negatives) for phantom cases;
- :mod:`shared.pretrain.config` — :class:`~shared.pretrain.config.BuildConfig`, the build's one source of defaults;
- :mod:`shared.pretrain.data` — phantoms, reports, the sentence bank and frozen MiniLM features for training;
- :mod:`shared.pretrain.build` — contrastive pretraining of a small open_clip image tower against the frozen
  MiniLM text tower, and the artifact writer (``retune build-backbone``);
- :mod:`shared.pretrain.artifact` — checksum verification and assembly of a complete open_clip local directory
  (used by :func:`shared.backbone.load_backbone` for the spec ``retune-minilm-phantom`` or a built folder);
- :mod:`shared.pretrain.evaluate` — zero-shot and adaptor AUROC on ``retune simulate``-like phantom hospitals;
- :mod:`shared.pretrain.card` — the artifact's MODEL_CARD.md.

Kept free of imports so that :mod:`shared.backbone` can use :mod:`shared.pretrain.artifact` cheaply.
"""
