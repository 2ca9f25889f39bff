"""Console presentation of a labeling job (Rich): live progress bars per stage, and the per-iteration table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from labeling.inspect import Inspection
from labeling.job import Events, JobEvent

_STAGES = {
    "read": "reading the collection",
    "neighbours": "kNN graph from the store",
    "iteration": "self-training iterations",
    "write": "writing pseudo-labels",
}


@contextmanager
def rich_events(console: Console, *, enabled: bool = True) -> Iterator[Events]:
    """An ``events`` callback that draws one progress bar per stage and prints warnings and messages."""
    if not enabled:
        yield lambda e: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    ) as progress:
        tasks: dict[str, Any] = {}

        def on_event(e: JobEvent) -> None:
            if e.message and e.stage in ("guards", "drift", "gate", "warning"):
                progress.console.print(f"[yellow bold]warning:[/] {e.message}")
            if e.stage not in _STAGES:
                if e.stage == "train" and "iteration" in tasks:
                    progress.update(tasks["iteration"], note=e.message)
                return
            if e.stage not in tasks:
                tasks[e.stage] = progress.add_task(_STAGES[e.stage], total=e.total or None, note="")
            note = ""
            if e.stage == "iteration" and "stats" in e.data:  # in-process
                s = e.data["stats"]
                note = f"held-out F1 {s.heldout_after.macro_f1:.3f}, accepted {s.counts.get('accepted', 0)}"
                if e.data.get("breaker"):
                    note = "collapse breaker tripped"
            elif e.stage == "iteration" and "summary" in e.data:  # over gRPC (an IterationSummary)
                m = e.data["summary"]
                note = f"held-out F1 {m.heldout_macro_f1:.3f}, accepted {m.accepted}"
                if m.breaker_tripped:
                    note = "collapse breaker tripped"
            progress.update(tasks[e.stage], completed=e.done, total=e.total or None, note=note)

        yield on_event


def id_column(name: str, ids: Sequence[str]) -> Column:
    """A table column that shows ids whole (they are what the next command takes) whatever the terminal's width,
    up to 48 characters."""
    return Column(name, no_wrap=True, min_width=min(max((len(i) for i in ids), default=0), 48))


def fitted_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int,
    shrink: str = "text",
    max_shrink: int = 40,
    min_shrink: int = 8,
    title: str | None = None,
) -> Table:
    """A table whose cells are never cut, but for the ``shrink`` column (free text), which gets what the
    terminal has left (at most ``max_shrink``), or is left out below ``min_shrink`` characters.

    Rich's own fitting squeezes every column alike: at 80 columns labels such as "Smileys & Emotion" came out
    as "Smil… & Emot…" and numbers as "0…", while the free text kept its share. Ids, labels and numbers are
    what a person acts on; the text is context. When even the other columns cannot fit on one line, each row is
    shown as a block of "field value" lines instead."""
    # a table without free text (the suspect-seed list) has nothing to shrink: it fits whole or goes to blocks
    k = list(headers).index(shrink) if shrink in headers else None
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    others = sum(w for i, w in enumerate(widths) if i != k)
    frame = 3 * len(headers) + 1  # a rule and one space of padding on each side per column, and the last rule
    left = width - frame - others
    keep = left >= (min(min_shrink, widths[k]) if k is not None else 0)
    fits = keep or (k is not None and width - (frame - 3) - others >= 0)
    if not fits:  # one block per row: nothing is cut, and no column is squeezed to a letter per line
        table = Table(Column("field", no_wrap=True, style="bold"), Column("value", overflow="fold"), title=title)
        table.show_header = False
        for r in rows:
            for h, cell in zip(headers, r, strict=True):
                table.add_row(h, cell)
            table.add_section()
        return table
    cols = [i for i in range(len(headers)) if keep or i != k]
    table = Table(
        *[
            Column(
                headers[i],
                no_wrap=True,
                overflow="ellipsis",
                max_width=max(1, min(left, max_shrink)) if i == k else None,
            )
            for i in cols
        ],
        title=title,
    )
    for r in rows:
        table.add_row(*[r[i] for i in cols])
    if not keep:
        table.caption = f"({shrink} left out: the terminal is {width} columns wide)"
    return table


def neighbour_table(view: Inspection, *, text_width: int = 40, width: int | None = None) -> Table:
    """A point's neighbours with their labels, pseudo-labels, status, confidence and text (``width``: the
    terminal's, to fit the text column into it; see :func:`fitted_table`)."""
    headers = ["similarity", "id", "text", "ground truth", "pseudo-label", "status", "confidence"]
    rows = []
    for n in view.neighbours:
        ns = n.point.state
        rows.append(
            [
                f"{n.similarity:.3f}",
                n.point.id,
                str(n.point.payload.get("text", ""))[:text_width],
                ns.label or "",
                ns.pseudo_label or "",
                ns.pseudo_status or "",
                "" if ns.pseudo_confidence is None else f"{ns.pseudo_confidence:.3f}",
            ]
        )
    if width is not None:
        return fitted_table(headers, rows, width=width, max_shrink=text_width)
    table = Table(*[id_column(h, [r[1] for r in rows]) if h == "id" else h for h in headers])
    for r in rows:
        table.add_row(*r)
    return table


def agreement_line(view: Inspection) -> str:
    a = view.agreement
    return (
        f"agreement with {a.label!r}: {a.weighted:.2f} weighted, {a.unweighted:.2f} unweighted over "
        f"{a.labelled_neighbours} labelled neighbours; majority {a.majority_label!r} ({a.majority_share:.2f})"
    )


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "" if v is None else fmt.format(v)


def iteration_table(report: dict[str, Any]) -> Table:
    has_truth = any(r.get("pseudo_precision") is not None for r in report["iterations"])
    cols = ["iter", "held-out F1", "ECE raw", "ECE cal", "calibration", "accepted", "revoked", "review", "mean conf"]
    if has_truth:
        cols.append("precision*")
    table = Table(
        *cols, title=f"run {report['run_id']} ({report['eval_mode']}, {report['models_per_iteration']} models)"
    )
    for r in report["iterations"]:
        written = r["iteration"] == report["chosen_iteration"]
        broke = bool(r.get("breaker"))  # scored, never gated: no counts to show (see IterationStats.breaker)
        row = [
            f"{r['iteration']}{' *' if written else ''}",
            _f(r["heldout_after"]["macro_f1"]),
            _f(r["heldout_before"]["ece"]),
            _f(r["heldout_after"]["ece"]),
            r["calibration_method"],
            "breaker" if broke else str(r["counts"].get("accepted", "")),
            "-" if broke else str(r["revoked"]),
            "-" if broke else str(r["counts"].get("review", "")),
            _f(r.get("mean_accepted_confidence")),
        ]
        if has_truth:
            row.append(_f(r.get("pseudo_precision")))
        table.add_row(*row)
    if has_truth:
        table.caption = (
            "* precision of accepted pseudo-labels against the known truth (evaluation only); iter * = written"
        )
    else:
        table.caption = "iter * = the iteration whose labels were written"
    return table


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(iteration_table(report))
    f = report["final"]
    console.print(f"[bold]stopped:[/] {report['stop_reason']}")
    console.print(
        f"[bold]written[/] {report.get('written', 0)} points: {f['counts']}  coverage {f['coverage']:.1%}  "
        f"mean accepted confidence {_f(f['mean_accepted_confidence'])}"
    )
    if f.get("pseudo_precision") is not None:
        console.print(
            f"[bold]accepted pseudo-labels correct[/] (vs known truth): {f['pseudo_precision']:.3f}; "
            f"macro-F1 of all pool proposals vs truth {f['pool_macro_f1_vs_truth']:.3f}"
        )
    cal = report["calibration"]
    console.print(
        f"[bold]calibration[/] ({cal['method']}, held-out, out-of-fold): ECE {cal['before']['ece']:.3f} -> "
        f"{cal['after']['ece']:.3f}, Brier {cal['before']['brier']:.3f} -> {cal['after']['brier']:.3f}"
    )
    d = report["drift"]
    console.print(
        f"[bold]drift[/] (seed vs pool, C2ST AUC): {_f(d['auc'])} (threshold {d['threshold']}, "
        f"{'DRIFTED' if d['drifted'] else 'ok'})"
    )
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"[bold]report and plots:[/] {report['plots']['reliability'].rsplit('/', 1)[0]}/")
