"""bnorm.BatchNorm2d vs torch.nn.BatchNorm2d, forward+backward in training, ResNet-20
shapes, NCHW and channels_last; writes benchmarks/results/layer.json.

    python benchmarks/bench_layer.py [--repeats 30] [--warmup 5] [--quick]

(The same as ``bnorm bench layer --out benchmarks/results/layer.json``.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from bnorm.cli import main

RESULT = Path(__file__).resolve().parent / "results" / "layer.json"

if __name__ == "__main__":
    sys.exit(main(["bench", "layer", "--out", str(RESULT), *sys.argv[1:]]))
