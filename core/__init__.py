"""The leaf of the import graph: what every layer shares and nothing of the project is imported by.

- `config`: the typed declaration of a config file (pipeline keys, the keys every head accepts, the
  base of a head's own params) and the one-line error messages made from it;
- `tables`: the declaration of a result table (its columns, what a downstream `where` sees);
- `doc`: the row type a head reads; `errors`: the exceptions layers raise to each other;
- `faults`: test-only fault injection; `metrics`: evaluation metrics; `progress`: run events.

Imports run one way: taskheads (cli, demo, report, server) -> flows -> tasks -> pipeline / training ->
heads / storage -> core. tests/test_layers.py walks the graph and fails on a cycle.
"""
import os as _os

# Arrow picks the allocator its C++ side uses (Parquet reads, kernels) once, as libarrow loads, from this
# variable: its default, mimalloc, reserves 1 GiB and kept 75-95MB more resident by the end of a 1M-document
# run than the system allocator (core.memory). Every entry point (the CLI, the flow, the tasks) imports
# this package before pyarrow; a value the user set wins.
_os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
