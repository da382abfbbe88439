"""Imported before any of its modules: `core` picks Arrow's allocator before pyarrow loads."""
import core  # noqa: F401
