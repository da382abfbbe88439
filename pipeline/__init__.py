"""The pipeline as a config file says it: the file parsed and checked against the registered heads
(`config`), and the checks that need the corpus (`preflight`), before any model is loaded or row read.

Sits above heads and storage (it asks the head registry what a task accepts and writes, and the SQL
sandbox whether a `where` is one expression) and below tasks, flows and the CLI.
"""
