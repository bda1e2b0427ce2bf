"""`bnorm bench layer` runs end to end and writes its JSON (a smoke run: no timings checked);
the ``bnorm`` command imports only the subcommand it runs."""

from __future__ import annotations

import json
import subprocess
import sys

from bnorm.cli import main


def test_bench_layer_quick_run_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "layer.json"
    code = main(["bench", "layer", "--quick", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    layer = result["suites"]["layer"]
    cases = {(row["shape"], row["layout"]) for row in layer["rows"]}
    assert cases == {
        (f"16x{c}x{s}x{s}", layout)
        for c, s in ((16, 32), (32, 16), (64, 8))
        for layout in ("NCHW", "channels_last")
    }
    for row in layer["rows"]:
        assert row["torch_ms"] > 0 and row["bnorm_ms"] > 0
        assert abs(row["bnorm/torch"] - row["bnorm_ms"] / row["torch_ms"]) < 1e-9
    assert layer["worst_ratio"] == max(row["bnorm/torch"] for row in layer["rows"])
    assert [row["options"] for row in layer["per_call"]] == ["default", "skip_nonfinite=False"]
    for row in layer["per_call"]:
        assert row["shape"] == "8x16x4x4" and row["torch_us"] > 0 and row["bnorm_us"] > 0
        assert abs(row["extra_us"] - (row["bnorm_us"] - row["torch_us"])) < 1e-9
    assert "machine" in result and result["machine"]["torch"]
    printed = capsys.readouterr().out
    assert "overall (geometric mean)" in printed and "fixed cost per call" in printed


def test_the_command_imports_only_the_subcommand_it_runs():
    probe = (
        "import sys\n"
        "from bnorm.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('bnorm.')}))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, "bench", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: bnorm bench" in run.stdout
    loaded = run.stdout.strip().splitlines()[-1]
    assert "'bench'" in loaded and "'study'" not in loaded
