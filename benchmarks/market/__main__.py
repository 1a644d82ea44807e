"""``python -m benchmarks.market [--trace FILE] [--seed N] [--json] [--plot FILE]`` (see the package doc)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
