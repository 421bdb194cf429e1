"""Speed benchmarks of median_sgd: scripts that print ratio tables and write ``results/*.json``.

Run ``python -m benchmarks`` (every suite) or ``python -m benchmarks SUITE ...``. Each suite is a
module of this package with ``run(device, *, quick) -> list[dict]`` returning tidy rows; the
numbers that matter are ratios against a reference measured in the same run (``_harness``).
Not tests: nothing here is timed by pytest.
"""
