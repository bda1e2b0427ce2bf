"""``bnorm study``: the classic batch-normalization experiments, with and without BN.

Modules, top to bottom; each imports only those below it (an import-linter contract in
pyproject.toml checks it, imports inside functions included):

* :mod:`~bnorm.study.cli` — the command's options, exit codes;
* :mod:`~bnorm.study.runner` — schedule, train, resume, metrics, report;
* :mod:`~bnorm.study.executors` — where the runs train: this process, worker processes
  (``--jobs``), Ray tasks, Slurm jobs (submitit);
* :mod:`~bnorm.study.progress` and :mod:`~bnorm.study.summary` — the terminal display;
* :mod:`~bnorm.study.config` — defaults, presets, config files, precedence;
* :mod:`~bnorm.study.experiments` — the experiment table;
* :mod:`~bnorm.study.report` — the document (summary table, each kind's section), HTML
  and Markdown;
* :mod:`~bnorm.study.kinds` — one module per kind of experiment: how its runs are
  scheduled, summarized and reported;
* :mod:`~bnorm.study.blocks` — the report's blocks, number formats and figure helpers;
* :mod:`~bnorm.study.train` — one run (``train_run``): seeded, recorded, checkpointed;
* :mod:`~bnorm.study.measurements` — what is measured on a trained network;
* :mod:`~bnorm.study.shift` and :mod:`~bnorm.study.corruptions` — distribution shift;
* :mod:`~bnorm.study.loop` — ``train_one_epoch``, ``evaluate``, the batches;
* :mod:`~bnorm.study.checkpoint` — run files and checkpoints;
* :mod:`~bnorm.study.spec` — ``TrainSpec`` and its rules;
* :mod:`~bnorm.study.models` — the networks and the name → normalization-layer registry;
* :mod:`~bnorm.study.data` — datasets from local files.

Nothing is imported here, so ``bnorm --help`` stays fast.
"""
