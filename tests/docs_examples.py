"""The fenced examples of README.md and docs/*.md, and the process that runs them (tests/test_docs_examples.py).

Every ```python and ```bash block runs, in page order. An HTML comment on the line right above a block
changes that (it does not show on the rendered page):

* ``<!-- docs-example: skip REASON -->``: never run (an install line, the suite itself, an 8-chip launch);
* ``<!-- docs-example: pending FEATURE -->``: not run yet (a feature another branch brings; delete the comment
  to run it);
* ``<!-- docs-example: serve -->``: the ``maxjax serve`` command the test starts once, in the background,
  before any example; every block that names port 8000 then talks to it (on a free port substituted for 8000).

A page's Python blocks share one namespace, as a notebook's cells do; its shell blocks run with ``bash -e``.
All of them run in one folder (``--workdir``), which holds the example files the pages name (``adapters/sql``
...). Run as a script, this module executes the pages and writes one JSON result per block.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = ("python", "bash")
MARKERS = ("skip", "pending", "serve")
_MARKER = re.compile(r"^<!--\s*docs-example:\s*(\S+)\s*(.*?)\s*-->\s*$", re.S)
_PORT = re.compile(r"\b(localhost|127\.0\.0\.1):8000\b")


@dataclass(frozen=True)
class Example:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None = None
    reason: str = ""

    @property
    def runs(self) -> bool:
        return self.marker is None

    @property
    def needs_server(self) -> bool:
        return bool(_PORT.search(self.code))


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def examples(path: Path) -> list[Example]:
    """The python and bash blocks of one page, each with the marker comment right above it (if any)."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").parse(path.read_text())
    found = []
    for i, token in enumerate(tokens):
        lang = token.info.split()[0] if token.type == "fence" and token.info.strip() else ""
        if lang not in LANGUAGES:
            continue
        marker, reason = None, ""
        before = tokens[i - 1] if i else None
        if before is not None and before.type == "html_block" and before.map[1] == token.map[0]:
            match = _MARKER.match(before.content.strip())
            if match is None:
                raise ValueError(f"{path.name}:{before.map[0] + 1}: an HTML comment above an example must read "
                                 "'<!-- docs-example: skip|pending|serve REASON -->'")
            marker, reason = match.groups()
        found.append(Example(str(path.relative_to(ROOT)), token.map[0] + 1, lang, token.content, marker, reason))
    return found


def serve_command(port: int) -> list[str]:
    """The arguments of the one block marked ``serve`` (``maxjax serve ...``), its ``--port`` replaced by
    ``port``."""
    import shlex

    blocks = [e for p in pages() for e in examples(p) if e.marker == "serve"]
    if len(blocks) != 1:
        raise ValueError(f"expected one block marked 'docs-example: serve', found {len(blocks)}")
    words = shlex.split(blocks[0].code.replace("\\\n", " "), comments=True)
    if words[:2] != ["maxjax", "serve"]:
        raise ValueError(f"{blocks[0].page}:{blocks[0].line}: the serve block must be one 'maxjax serve' command")
    args = words[2:]
    if "--port" in args:
        del args[args.index("--port"):args.index("--port") + 2]
    return args + ["--port", str(port)]


def with_port(code: str, port: int | None) -> str:
    return code if port is None else _PORT.sub(f"127.0.0.1:{port}", code)


def shims(folder: Path) -> Path:
    """``maxjax`` and ``python`` run this interpreter on this checkout; ``curl`` fails on an HTTP error (so an
    example whose request is refused fails, where plain ``curl -s`` exits 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    scripts = {"maxjax": f'exec "{sys.executable}" -m maxjax "$@"', "python": f'exec "{sys.executable}" "$@"'}
    curl = subprocess.run(["bash", "-c", "command -v curl"], capture_output=True, text=True).stdout.strip()
    scripts["curl"] = f'exec "{curl}" --fail-with-body "$@"' if curl else 'echo "curl is not installed" >&2; exit 127'
    for name, body in scripts.items():
        script = folder / name
        script.write_text(f"#!/usr/bin/env bash\n{body}\n")
        script.chmod(0o755)
    return folder


def _run_bash(example: Example, code: str, workdir: Path, env: dict[str, str]) -> str | None:
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=900)
    sys.stdout.write(done.stdout + done.stderr)
    if done.returncode:
        return f"exit status {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return None


def _run_python(example: Example, code: str, namespace: dict) -> str | None:
    try:
        exec(compile(code, f"{example.page}:{example.line}", "exec"), namespace)
    except BaseException:  # noqa: BLE001 - a failing example is a result, not the runner's end
        return traceback.format_exc()[-6000:]
    return None


def run_pages(paths: list[Path], workdir: Path, port: int | None) -> list[dict]:
    """Runs every runnable block; after a failure the rest of that page is 'not run'."""
    env = {**os.environ, "PATH": f"{shims(workdir / '.bin')}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}
    os.chdir(workdir)
    results = []
    shell_runs: dict[str, str] = {}  # a shell block repeated verbatim on another page runs once
    for path in paths:
        namespace: dict = {"__name__": "__main__"}
        failed = False
        for example in examples(path):
            result = {**asdict(example), "status": "skipped", "error": None, "seconds": 0.0}
            results.append(result)
            if not example.runs:
                continue
            if failed or (example.needs_server and port is None):
                result["status"] = "not run"
                continue
            if example.lang == "bash" and example.code in shell_runs:
                result.update(status="passed", error=f"the same block as {shell_runs[example.code]}, which passed")
                continue
            print(f"\n=== {example.page}:{example.line} ({example.lang})", flush=True)
            start = time.perf_counter()
            code = with_port(example.code, port)
            error = (_run_bash(example, code, workdir, env) if example.lang == "bash"
                     else _run_python(example, code, namespace))
            result.update(status="failed" if error else "passed", error=error,
                          seconds=round(time.perf_counter() - start, 1))
            failed = failed or error is not None
            if example.lang == "bash" and error is None:
                shell_runs[example.code] = f"{example.page}:{example.line}"
            sys.stdout.flush()
        namespace.clear()
        with contextlib.suppress(Exception):
            import gc

            gc.collect()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pages", nargs="*", help="pages to run (default: README.md and docs/*.md)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--port", type=int, default=None, help="the running 'maxjax serve' (none: skip its examples)")
    parser.add_argument("--out", required=True, help="JSON results")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # the examples import this checkout's maxjax, as the shell shims run it
    paths = [Path(p).resolve() for p in args.pages] or pages()
    results = run_pages(paths, Path(args.workdir).resolve(), args.port)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
