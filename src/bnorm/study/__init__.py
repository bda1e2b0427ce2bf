"""``bnorm study``: the classic batch-normalization experiments, with and without BN.

Modules: :mod:`~bnorm.study.data` (datasets from local files), :mod:`~bnorm.study.models`
(the networks and the name → normalization-layer registry), :mod:`~bnorm.study.train`
(seeded, checkpointed training; ``train_one_epoch``/``evaluate``),
:mod:`~bnorm.study.experiments` (experiment kinds), :mod:`~bnorm.study.report` (figures,
HTML and Markdown) and :mod:`~bnorm.study.run` (the command and the experiment list).
Nothing is imported here, so ``bnorm --help`` stays fast.
"""
