"""``bnorm study``: the classic batch-normalization experiments, with and without BN.

Modules, each importing only those below it: :mod:`~bnorm.study.cli` (the command's
options, exit codes), :mod:`~bnorm.study.runner` (plan, train, resume, metrics),
:mod:`~bnorm.study.progress` and :mod:`~bnorm.study.summary` (the terminal display),
:mod:`~bnorm.study.config` (defaults, presets, config files, precedence),
:mod:`~bnorm.study.experiments` (the experiment table), :mod:`~bnorm.study.kinds`
(how each kind of experiment is planned and summarized), :mod:`~bnorm.study.report`
(figures, HTML and Markdown), :mod:`~bnorm.study.shift` and
:mod:`~bnorm.study.corruptions` (distribution shift), :mod:`~bnorm.study.train`
(seeded training; ``train_one_epoch``/``evaluate``), :mod:`~bnorm.study.checkpoint`
(run files and checkpoints), :mod:`~bnorm.study.models` (the networks and the name →
normalization-layer registry) and :mod:`~bnorm.study.data` (datasets from local files).
Nothing is imported here, so ``bnorm --help`` stays fast.
"""
