"""Merge a run's part files into results.parquet, summary.json, table.md and the figures.

`write_report(out)` reads every `OUT/parts/<row>/<case>.json` (from any number of processes or
machines), so it can run again at any time (`largen eval report`); each file it writes goes to a
temporary name first and is renamed into place.
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from evaluation.harness import EvalError, read_part, write_atomic
from evaluation.rows import ROWS, SWEEP_BETAS, SWEEP_ROWS

METRICS = ("clip_i", "clip_t", "dino_i", "psnr_bg", "changed_bg")
RESULT_COLUMNS = [
    "case_id", "row", "status", "error", "scene_id", "subject", "kind", "prompt_index", "prompt", "seed",
    "seconds", "image", "margin", *METRICS, "process",
]  # fmt: skip

# The paper's published figures (CLIP-I, CLIP-T), Tables 1 and 2.
PAPER_TABLE1 = {
    "sd-inpainting": (68.68, 30.37),
    "paint-by-example": (79.02, 24.70),
    "anydoor": (82.10, 25.52),
    "largen-b0.3": (79.15, 29.94),
    "largen-b1.0-notext": (83.39, 26.07),
}
PAPER_TABLE2 = {
    "sd-inpainting": ("SD-Inpainting (Baseline)", 68.68, 30.37),
    "locate": ("+ Locate mechanism", 68.60, 31.01),
    "assign": ("++ Assign mechanism", 75.00, 30.53),
    "largen-b0.3": ("+++ Refine mechanism", 79.15, 29.94),
}
TABLE1_ORDER = ("sd-inpainting", "paint-by-example", "anydoor", "largen-b0.3", "largen-b1.0-notext", "largen-text", "sdiipa")
CONTACT_CASES = 8
THUMB = 96


def collect(out: Path) -> list[dict]:
    """Every part record under `out/parts`, sorted by row then case.

    Raises:
        EvalError: there is no part at all (nothing has run in `out`).
    """
    records = []
    for path in sorted((out / "parts").glob("*/*.json")):
        record = read_part(path)
        if record is not None:
            records.append(record)
    if not records:
        raise EvalError(f"--out {str(out)!r} holds no results (no parts/<row>/<case>.json); run `largen eval run` first")
    return records


def _ordered(names) -> list[str]:
    """Row names in table order (Table 1, Table 2, the sweep), unknown names last."""
    order = {name: i for i, name in enumerate(ROWS)}
    return sorted(dict.fromkeys(names), key=lambda n: (order.get(n, len(order)), n))


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return round(float(np.mean(vals)), 4) if vals else None


def summarize(records: list[dict]) -> dict:
    """Per row: label, prompts, cases ok / failed, mean of each metric and of the seconds per case."""
    by_row: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_row[r["row"]].append(r)
    rows = {}
    for name in _ordered(by_row):
        recs = by_row[name]
        ok = [r for r in recs if r["status"] == "ok"]
        row = ROWS.get(name)
        rows[name] = {
            "label": row.label if row else name,
            "prompts": row.prompts if row else "",
            "beta": row.beta if row else None,
            "cases_ok": len(ok),
            "cases_failed": len(recs) - len(ok),
            **{m: _mean(r.get(m) for r in ok) for m in METRICS},
            "seconds_per_case": _mean(r.get("seconds") for r in ok),
        }
    return rows


def _fmt(value, digits: int = 2, scale: float = 1.0) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def table_markdown(rows: dict, run_info: dict) -> str:
    """Tables 1 and 2 and the Fig. 13 sweep in the paper's layout, ours beside the paper's figures."""
    settings = run_info.get("settings", {})
    lines = [
        "# LAR-Gen evaluation",
        "",
        f"Benchmark `{settings.get('bench', '?')}` ({settings.get('bench_cases', '?')} cases), model "
        f"`{settings.get('model', '?')}`, {settings.get('steps', '?')} steps, guidance {settings.get('guidance', '?')}. "
        "CLIP-I, CLIP-T, DINO-I: 100 x cosine; PSNR and changed pixels: outside the mask (docs/evaluation.md).",
        "",
        "## Table 1: comparison with existing methods",
        "",
        "| Methods | Prompts | CLIP-I | CLIP-T | DINO-I | PSNR bg (dB) | changed bg (%) | cases | paper CLIP-I | paper CLIP-T |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in TABLE1_ORDER:
        paper = PAPER_TABLE1.get(name)
        paper_cols = f"{paper[0]:.2f} | {paper[1]:.2f}" if paper else "— | —"
        if name == "anydoor":
            lines.append(f"| Anydoor (not run: no diffusers implementation) | image&mask | — | — | — | — | — | 0 | {paper_cols} |")
            continue
        if name not in rows:
            if paper:
                lines.append(f"| {ROWS[name].label} (not run) | {ROWS[name].prompts} | — | — | — | — | — | 0 | {paper_cols} |")
            continue
        lines.append(_row_line(rows[name], paper_cols))
    lines += [
        "",
        "## Table 2: ablation of the components",
        "",
        "| Module | CLIP-I | CLIP-T | DINO-I | PSNR bg (dB) | changed bg (%) | cases | paper CLIP-I | paper CLIP-T |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (label, p_i, p_t) in PAPER_TABLE2.items():
        r = rows.get(name)
        if r is None:
            lines.append(f"| {label} (not run) | — | — | — | — | — | 0 | {p_i:.2f} | {p_t:.2f} |")
        else:
            lines.append(
                f"| {label} | {_fmt(r['clip_i'])} | {_fmt(r['clip_t'])} | {_fmt(r['dino_i'])} | {_fmt(r['psnr_bg'])} | "
                f"{_fmt(r['changed_bg'], 3, 100)} | {_cases(r)} | {p_i:.2f} | {p_t:.2f} |"
            )
    lines += [
        "",
        "## Fig. 13: image-prompt strength β (text + subject)",
        "",
        "The paper plots this sweep without publishing the numbers (CLIP-I rises and CLIP-T falls with β); "
        "it trains one stage-2 model per β, this harness varies β at inference on one model.",
        "",
        "| β | CLIP-I | CLIP-T | DINO-I | cases |",
        "|---|---|---|---|---|",
    ]
    for beta, name in zip(SWEEP_BETAS, SWEEP_ROWS):
        r = rows.get(name)
        if r is not None and _sweep_ran(rows):
            lines.append(f"| {beta:.1f} | {_fmt(r['clip_i'])} | {_fmt(r['clip_t'])} | {_fmt(r['dino_i'])} | {_cases(r)} |")
    lines += ["", "Seconds per case (mean, generation only):", ""]
    lines += [f"- {name}: {_fmt(r['seconds_per_case'], 3)}" for name, r in rows.items()]
    return "\n".join(lines) + "\n"


def _sweep_ran(rows: dict) -> bool:
    """Whether a sweep row other than Table 1's beta = 0.3 row ran (else there is no sweep to show)."""
    return any(n in rows for n in SWEEP_ROWS if n != "largen-b0.3")


def _cases(r: dict) -> str:
    return f"{r['cases_ok']}" + (f" (+{r['cases_failed']} failed)" if r["cases_failed"] else "")


def _row_line(r: dict, paper_cols: str) -> str:
    return (
        f"| {r['label']} | {r['prompts']} | {_fmt(r['clip_i'])} | {_fmt(r['clip_t'])} | {_fmt(r['dino_i'])} | "
        f"{_fmt(r['psnr_bg'])} | {_fmt(r['changed_bg'], 3, 100)} | {_cases(r)} | {paper_cols} |"
    )


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def sweep_plot(rows: dict) -> bytes | None:
    """Fig. 13: CLIP-T (x) against CLIP-I (y), one point per β, PNG bytes; None without a sweep."""
    points = [(b, rows[n]) for b, n in zip(SWEEP_BETAS, SWEEP_ROWS) if n in rows and rows[n]["clip_i"] is not None]
    if not _sweep_ran(rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    xs = [r["clip_t"] for _, r in points]
    ys = [r["clip_i"] for _, r in points]
    ax.plot(xs, ys, "o-", color="tab:blue")
    for (beta, _), x, y in zip(points, xs, ys):
        ax.annotate(f"β={beta:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("CLIP-T")
    ax.set_ylabel("CLIP-I")
    ax.set_title("Image-prompt strength β (Fig. 13)")
    ax.grid(alpha=0.3)
    data = _png_bytes(fig)
    plt.close(fig)
    return data


def subject_bars(records: list[dict]) -> bytes:
    """Per-subject mean CLIP-I and CLIP-T of every row, grouped bars, PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    subjects = sorted({r["subject"] for r in ok}) or ["—"]
    row_names = _ordered(r["row"] for r in ok)
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.2 * len(subjects) + 2), 7), squeeze=False)
    width = 0.8 / max(1, len(row_names))
    for ax, metric in zip(axes[:, 0], ("clip_i", "clip_t")):
        for k, name in enumerate(row_names):
            means = [
                _mean(r[metric] for r in ok if r["row"] == name and r["subject"] == s) or 0.0 for s in subjects
            ]
            ax.bar(np.arange(len(subjects)) + k * width, means, width, label=name, color=plt.cm.tab20(k % 20))
        ax.set_xticks(np.arange(len(subjects)) + width * (len(row_names) - 1) / 2, subjects, rotation=30, ha="right")
        ax.set_ylabel({"clip_i": "CLIP-I", "clip_t": "CLIP-T"}[metric])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=7)
    axes[0, 0].set_title("Per-subject scores")
    data = _png_bytes(fig)
    plt.close(fig)
    return data


def contact_sheet(out: Path, bench: Path, records: list[dict], cases: int = CONTACT_CASES) -> bytes:
    """A grid: per case, source (box drawn), mask, subject, then each row's output; PNG bytes."""
    from evaluation.metrics import box_mask, on_white

    ok = [r for r in records if r["status"] == "ok"]
    row_names = _ordered(r["row"] for r in ok)
    by_case: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in ok:
        by_case[r["case_id"]][r["row"]] = r
    table = {c["case_id"]: c for c in pq.read_table(bench / "cases.parquet").to_pylist()}
    chosen = [cid for cid in sorted(by_case) if cid in table][:cases]
    cols = 3 + len(row_names)
    label_h = 14
    sheet = Image.new("RGB", (cols * THUMB, label_h + len(chosen) * THUMB), "white")
    draw = ImageDraw.Draw(sheet)
    for k, title in enumerate(["source", "mask", "subject", *row_names]):
        draw.text((k * THUMB + 2, 1), title[:16], fill="black")
    for i, cid in enumerate(chosen):
        case = table[cid]
        with Image.open(bench / case["scene_path"]) as img:
            scene = img.convert("RGB")
        boxed = scene.copy()
        ImageDraw.Draw(boxed).rectangle(tuple(case["box"]), outline=(255, 0, 0), width=2)
        with Image.open(bench / case["subject_path"]) as img:
            subject = on_white(img.convert("RGBA"))
        tiles = [boxed, box_mask(case["box"], scene.size).convert("RGB"), subject]
        for name in row_names:
            r = by_case[cid].get(name)
            if r and (out / r["image"]).is_file():
                with Image.open(out / r["image"]) as img:
                    tiles.append(img.convert("RGB"))
            else:
                tiles.append(Image.new("RGB", (THUMB, THUMB), (220, 220, 220)))
        for k, tile in enumerate(tiles):
            tile = tile.copy()
            tile.thumbnail((THUMB, THUMB))
            sheet.paste(tile, (k * THUMB, label_h + i * THUMB))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def write_report(out: str | Path) -> dict:
    """Merge the parts of `out` and write every report file; returns the summary.

    Raises:
        EvalError: `out` holds no run.
    """
    out = Path(out)
    run_file = out / "run.json"
    if not run_file.is_file():
        raise EvalError(f"--out {str(out)!r} holds no run (no run.json); run `largen eval run` first")
    run_info = json.loads(run_file.read_text())
    records = collect(out)
    columns = {c: [r.get(c) for r in records] for c in RESULT_COLUMNS}
    types = {c: pa.float64() for c in (*METRICS, "seconds")}
    types.update(seed=pa.int64(), prompt_index=pa.int64(), process=pa.int64(), margin=pa.int64())
    table = pa.table({c: pa.array(v, type=types.get(c, pa.string())) for c, v in columns.items()})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    write_atomic(out / "results.parquet", buf.getvalue().to_pybytes())
    rows = summarize(records)
    summary = {
        "settings": run_info.get("settings", {}),
        "rows": rows,
        "not_run": {"anydoor": {"label": "Anydoor", "paper_clip_i": 82.10, "paper_clip_t": 25.52}},
        "paper": {"table1": PAPER_TABLE1, "table2": {k: v[1:] for k, v in PAPER_TABLE2.items()}},
        "cases_failed": sum(r["cases_failed"] for r in rows.values()),
    }
    write_atomic(out / "summary.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
    write_atomic(out / "table.md", table_markdown(rows, run_info).encode())
    plot = sweep_plot(rows)
    if plot is not None:
        write_atomic(out / "beta_sweep.png", plot)
    write_atomic(out / "per_subject.png", subject_bars(records))
    bench = Path(run_info.get("settings", {}).get("bench", ""))
    if (bench / "cases.parquet").is_file():
        write_atomic(out / "contact_sheet.png", contact_sheet(out, bench, records))
    return summary
