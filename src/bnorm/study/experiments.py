"""The study's experiments, in the order they run: :data:`EXPERIMENTS`.

Each entry names a kind (:data:`bnorm.study.kinds.KINDS`: how its runs are scheduled,
summarized and reported), overrides :class:`~bnorm.study.spec.TrainSpec`'s defaults
(``spec``), gives the kind's options (``options``) and, where it needs more than the
study's, its own ``seeds``. Adding an experiment is one entry here.
"""

from __future__ import annotations

from .kinds import Experiment

__all__ = ["EXPERIMENTS"]

# The network of the BN paper's Fig. 1: three hidden layers of 100 units, batches of 60.
_PAPER_MLP = {"model": "mlp", "hidden": [100, 100, 100], "init": "normal", "batch_size": 60}

EXPERIMENTS: list[Experiment] = [
    Experiment(
        name="curves",
        kind="curves",
        title="The BN paper's MNIST experiment, adapted",
        spec={
            **_PAPER_MLP,
            "activation": "sigmoid",
            "init_std": 0.1,
            "steps": 1500,
            "lr": 0.5,
            "eval_every": 20,
            "keep_predictions": True,
            "inference_check": True,
        },
        follows_model=True,
        about="Three fully connected hidden layers of 100 sigmoid units, small Gaussian "
        "initial weights, batches of 60, plain SGD — the network of the paper's Fig. 1, on "
        "the chosen dataset.",
    ),
    Experiment(
        name="lr_tolerance",
        kind="lr_sweep",
        title="Learning-rate tolerance",
        spec={
            **_PAPER_MLP,
            "activation": "relu",
            "init": "kaiming",
            "steps": 300,
            "eval_every": 300,
            "probe": False,
        },
        options={"lrs": [0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 4.0]},
        follows_model=True,
        about="The same 3×100 network with ReLU units and He initialization, trained for a "
        "fixed number of steps at each learning rate of a grid: the paper's claim that BN "
        "allows higher learning rates.",
    ),
    Experiment(
        name="depth",
        kind="curves",
        title="Depth: 10 hidden sigmoid layers",
        spec={
            "model": "deep-mlp",
            "hidden": [64] * 10,
            "activation": "sigmoid",
            "init": "xavier",
            "batch_size": 60,
            "steps": 600,
            "lr": 0.2,
            "eval_every": 20,
            "probe": False,
            "grad_norms": True,
        },
        about="Ten hidden layers of 64 sigmoid units with Glorot (Xavier) normal "
        "initialization: the depth at which vanishing gradients bite. The gradient norm of "
        "each layer's weights is measured at initialization and after training.",
    ),
    Experiment(
        name="small_batch",
        kind="batch_sweep",
        title="Small batches: BN, Batch Renorm, ghost BN, LayerNorm, moving-average BN",
        spec={
            **_PAPER_MLP,
            "activation": "relu",
            "init": "kaiming",
            "steps": None,
            "epochs": 1,
            "lr": 0.05,
            "eval_every": 10**6,
            "probe": False,
        },
        options={
            "batch_sizes": [2, 4, 8, 32],
            "norms": ["none", "bn", "renorm", "ghost", "ln", "mabn"],
            "recalibrated": ["bn"],  # also evaluated after bnorm.recalibrate
        },
        seeds=[0, 1, 2, 3, 4],
        about="The 3×100 ReLU network trained for one epoch at each batch size, 5 seeds: "
        "BN's statistics get noisy as the batch shrinks, and the running statistics used "
        "at test time drift from the batch statistics used in training. 'BN, recalibrated' "
        "is the same BN networks evaluated after bnorm.recalibrate (the exact training-set "
        "statistics in place of the running ones): what is left of the gap was lost in "
        "training, not at test time. Batch Renorm corrects the training-time normalization "
        "towards the running statistics (the paper's schedule scaled by 1/100 to these "
        "runs of 44 to 719 steps); ghost BN normalizes groups of 8 samples within larger "
        "batches. Moving-average BN (MABN, Yan et al. 2020) normalizes by the mean of x² "
        "averaged over the last 16 batches (the paper's window: batch 2 averaged to 32 "
        "samples) and uses the same average of the gradient statistic in backward, with "
        "the weights of each layer before it centered (bnorm.centralize_weights, as in "
        "the paper); its 100-step warm-up on batch statistics is scaled to 10 steps here. "
        "LayerNorm normalizes each sample over its 100 features: no batch statistics at "
        "all.",
    ),
    Experiment(
        name="accumulation",
        kind="accumulation",
        title="Gradient accumulation: running statistics per micro-batch or per step",
        spec={
            **_PAPER_MLP,
            "activation": "relu",
            "init": "kaiming",
            "batch_size": 4,
            "micro_batches": 8,
            "steps": None,
            "epochs": 3,
            "lr": 0.1,
            "eval_every": 22,
            "probe": False,
            "stats_check": True,
        },
        options={"norms": ["bn"]},
        about="The 3×100 ReLU network trained with gradient accumulation: each SGD step "
        "sums the gradients of 8 micro-batches of 4 samples, each normalized with its own "
        "statistics. Left alone, every BN layer updates its running statistics after each "
        "micro-batch (8 updates per step, each from 4 samples: the momentum then means "
        "1 − 0.9⁸ ≈ 0.57 per step); inside bnorm.accumulate it updates them once per step, "
        "from the exact merged moments of the step's 32 samples. Both arms start from the "
        "same weights and see the same micro-batches, and their gradients are identical "
        "(normalization is per micro-batch either way): only the running statistics "
        "differ. Measured: test accuracy in eval mode (running statistics), and how far "
        "the running statistics are from the exact statistics of each layer's inputs over "
        "the training set (bnorm.diagnose's drift, the KL divergence of the two Gaussians, "
        "worst channel, in mode='train').",
    ),
    Experiment(
        name="disagreement",
        kind="disagreement",
        title="Prediction disagreement",
        options={"source": "curves"},
        about="On the test set, how often the final networks of the first experiment with "
        "and without BN (same seed) predict different classes, and which of them is right "
        "when they do.",
    ),
    Experiment(
        name="shift",
        kind="shift",
        title="Distribution shift: corrupted test sets and test-time adaptation",
        options={"source": "curves"},
        about="The final networks of the first experiment on corrupted copies of the test "
        "set (Gaussian noise σ=0.3, contrast ×0.3, brightness +0.4, blur σ=1 px, inverted; "
        "pixel values in [0, 1], seeded): accuracy as trained, and for BN networks after "
        "bnorm.adapt — 'bn' (running statistics := the exact statistics of the corrupted "
        "test set), 'prior' (Schneider et al. 2020: each test batch of 32 normalized with "
        "the source statistics weighted as 16 samples mixed with the batch's own) and "
        "'tent' (Wang et al. 2021: one SGD step, lr 0.01, momentum 0.9, on the prediction "
        "entropy per test batch of 32, updating only BN's γ and β). Inverting the images "
        "flips the sign of the input, which no statistic can undo: adaptation is expected "
        "to fail there.",
    ),
]
