"""``show_table(rows)`` for the notebooks: a pandas DataFrame when pandas is installed, plain text otherwise.

pandas is optional (not in the ``[notebooks]`` extra), so every notebook runs without it.
"""

from __future__ import annotations


def show_table(rows: list[dict]) -> None:
    """Display a list of dicts (same keys, in order) as a table."""
    try:
        import pandas as pd
        from IPython.display import display
    except ImportError:
        columns = list(rows[0])
        cells = [[str(row[c]) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        for line in [columns, ["-" * w for w in widths], *cells]:
            print("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip())
        return
    display(pd.DataFrame(rows))
