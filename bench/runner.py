"""``cost-fast bench``: run the benchmark suites of this folder and write JSON, plots and tables.

Each suite is one pytest-benchmark file (``test_bench_<suite>.py``), run in a subprocess of its
own so that a crash or an out-of-memory in one leaves the others' results intact. Results are
named ``<suite>_<device>.json`` (device ``cpu`` or ``cuda``), each with a PNG beside it.
Everything is written to a staging folder first and moved into the output folder only when every
selected suite has passed: files of earlier runs (another device, another suite) stay, files of
this run are replaced whole. The output folder must be new, empty or one that ``cost-fast bench``
wrote before (it carries ``cost_fast.apps.report.MARKER``): a folder of the user's is never written
into. pytest-benchmark's own storage goes to the staging folder, not the current one. ``summary_<device>.md`` then gets the Markdown tables of every
suite's result of that device in the folder, this run's and earlier ones.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch

from cost_fast.apps.report import add_files, check_report_target

HERE = Path(__file__).parent
SUITES = ("gram", "grads", "solvers", "teleport", "adapter", "epoch", "train", "launches")
NO_TESTS_COLLECTED = 5  # pytest's exit status when a -k expression selects nothing in a file
USAGE_ERROR = 4  # pytest's exit status for a malformed -k expression


def device_tag() -> str:
    """``cuda`` when a GPU is present (the suites then run there), else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_benchmarks(
    out: str | os.PathLike,
    suites: Sequence[str] = SUITES,
    *,
    keyword: str | None = None,
    stream: TextIO = sys.stdout,
) -> list[Path]:
    """Run ``suites`` (all by default) and return the files written into ``out``.

    Args:
        out: output folder (created if missing; other files in it are kept).
        suites: a subset of ``SUITES``, run in the order given.
        keyword: a pytest ``-k`` expression selecting benchmarks inside the suites by name
            or parameters (e.g. ``"fast"``, ``"fairgrad and 3-"``); a suite it selects nothing
            from is skipped.
        stream: where the suites' pytest output and the tables are printed, as they come.

    Raises:
        ValueError: an unknown or repeated suite, no suite, an unwritable ``out``, or
            pytest-benchmark missing. RuntimeError: a suite failed (its pytest output says why).
    """
    suites = list(suites)
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites or len(set(suites)) != len(suites):
        raise ValueError(f"suites must be distinct names among {', '.join(SUITES)}; got {', '.join(suites) or 'none'}")
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise ValueError("the benchmarks need pytest-benchmark: pip install 'cost_fast[dev]'")
    out = check_report_target(out, merge=True)
    from cost_fast.bench.report import plot, table

    tag = device_tag()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    try:
        tables = []
        for suite in suites:
            result = staging / f"{suite}_{tag}.json"
            command = [
                sys.executable,
                "-m",
                "pytest",
                str(HERE / f"test_bench_{suite}.py"),
                "-q",
                "-p",
                "no:cacheprovider",
                # nothing of the checkout on sys.path (the suite runs in the staging folder, and
                # pytest adds no rootdir): its top-level bench/ would shadow the installed copy
                "--import-mode=importlib",
                f"--benchmark-json={result}",
                f"--benchmark-storage=file://{staging / 'storage'}",
                "--benchmark-columns=median,iqr,rounds",
            ] + (["-k", keyword] if keyword else [])
            print(f"== suite {suite} ({tag})", file=stream, flush=True)
            status = _run_streaming(command, stream, cwd=staging)
            if status == NO_TESTS_COLLECTED:
                print(f"   -k {keyword!r} selects nothing in suite {suite}: skipped", file=stream)
                result.unlink(missing_ok=True)
                continue
            if status == USAGE_ERROR:
                raise ValueError(f"pytest rejected the selection -k {keyword!r} (its output above says why)")
            if status != 0:
                raise RuntimeError(
                    f"benchmark suite {suite} failed (pytest exit status {status}); see its output above"
                )
            tables.append(table(result))
            plot(result)
        if not tables:
            raise ValueError(f"-k {keyword!r} selects no benchmark in suites {', '.join(suites)}")
        shutil.rmtree(staging / "storage", ignore_errors=True)
        names = sorted(path.name for path in staging.iterdir())
        add_files(staging, out, names)  # checked again now: the folder may have changed hands
        # the summary covers every suite's result of this device in the folder, earlier runs included
        results = [out / f"{suite}_{tag}.json" for suite in SUITES if (out / f"{suite}_{tag}.json").exists()]
        (staging / f"summary_{tag}.md").write_text("\n\n".join(table(path) for path in results) + "\n")
        add_files(staging, out, [f"summary_{tag}.md"])
        written = [out / name for name in [*names, f"summary_{tag}.md"]]
        print("\n\n".join(tables), file=stream)
        print(f"wrote {len(written)} files to {out}", file=stream)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run_streaming(command: list[str], stream: TextIO, cwd: Path) -> int:
    """Run ``command`` in ``cwd``, copying its output to ``stream`` line by line; returns its exit
    status. If this process is stopped meanwhile (a signal, an error), the command is ended too
    (SIGTERM, then SIGKILL after 10 s): no suite outlives the run that started it."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=cwd)
    try:
        for line in proc.stdout:
            stream.write(line)
            stream.flush()
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        proc.stdout.close()
