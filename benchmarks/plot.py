"""Result JSON files -> PNGs, one set per (benchmark, GPU):

* ``decode-speedup-<gpu>.png``: speedup over the best dense baseline against sparsity, one
  panel per (batch, tokens): each seerattn backend, FlexAttention block-sparse, the ideal
  (best dense / sparse floor), and the official SeerAttention-R TileLang kernel and
  FlexAttention from ``benchmarks/anchors`` (hollow markers; their speedup is over the SDPA
  of their own run);
* ``decode-roofline-<gpu>.png``: fraction of the bandwidth floor, same panels;
* ``gate-share-<gpu>.png``: the gate's share of the attention layer's decode time, one
  panel per batch, a line per context length (solid: parts timed alone, a step that
  completes blocks; dashed: cache update amortised over a block; dotted: marginal cost
  inside the whole step captured as one graph, update amortised);
* ``e2e-<gpu>.png``: decode tokens/s per method and mode, one panel per context, a group
  per batch, with each bar's bandwidth floor and the stock-transformers anchor.

    python benchmarks/plot.py benchmarks/results/decode-h100.json benchmarks/results/gate-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ANCHORS = Path(__file__).resolve().parent / "anchors" / "anchors.json"
SEERATTN_ORDER = ("tilelang", "triton", "torch")
COLORS = {"tilelang": "tab:red", "triton": "tab:blue", "torch": "tab:gray",
          "flex_sparse": "tab:green", "sdpa_flash": "tab:purple", "flex_dense": "tab:olive",
          "flashinfer": "tab:brown"}


def anchor_rows(kind: str, gpu: str | None) -> list[dict]:
    """The anchor rows of ``kind`` for this GPU model (h100/h200), or none."""
    if not gpu or not ANCHORS.exists():
        return []
    with open(ANCHORS) as fh:
        data = json.load(fh)[kind]
    for key, entry in data.items():
        if key in gpu.lower():
            return entry.get("rows", [])
    return []


def _tok(t: int) -> str:
    return f"{t // 1024}k" if t >= 1024 else str(t)


def _grid(rows: list[dict]) -> tuple[list[int], list[int]]:
    return sorted({r["batch"] for r in rows}), sorted({r["tokens"] for r in rows})


def _panels(nrows: int, ncols: int, title: str):
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.2 * ncols, 7.0), 2.6 * nrows + 0.4), squeeze=False,
                             sharex=True)
    fig.suptitle(title)
    return fig, axes


def _save(fig, out_dir: Path, name: str, bottom: float = 0.0) -> Path:
    fig.tight_layout(rect=(0, bottom, 1, 1))
    path = out_dir / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(path)
    return path


def _backends(rows: list[dict]) -> list[str]:
    present = {k.split("_")[1] for r in rows for k in r if k.startswith("seerattn_") and k.endswith("_ms")}
    return [b for b in SEERATTN_ORDER if b in present]


def _series(rows, fn):
    pts = sorted((r["sparsity"], fn(r)) for r in rows)
    pts = [(x, y) for x, y in pts if y is not None]
    return [x for x, _ in pts], [y for _, y in pts]


def plot_decode(data: dict, out_dir: Path) -> list[Path]:
    rows, info = data["rows"], data["info"]
    gpu = info.get("gpu")
    slug = C.gpu_slug(info)
    batches, tokens = _grid(rows)
    backends = _backends(rows)
    official = anchor_rows("official_seerattn_r", gpu)
    flex_anchor = anchor_rows("flexattention", gpu)
    paths = []
    for what in ("speedup", "roofline"):
        title = (f"{gpu or 'CPU'}: sparse decode, speedup over the best dense baseline"
                 if what == "speedup" else f"{gpu or 'CPU'}: fraction of the bandwidth floor")
        fig, axes = _panels(len(batches), len(tokens), title)
        for i, b in enumerate(batches):
            for j, t in enumerate(tokens):
                ax = axes[i][j]
                pr = [r for r in rows if r["batch"] == b and r["tokens"] == t]
                ax.set_title(f"batch {b}, {_tok(t)} tokens", fontsize=9)
                names = [(f"seerattn_{n}", n, n) for n in backends] + [("flex_sparse", "flex_sparse", "flex block-sparse")]
                for key, color, label in names:
                    if what == "speedup":
                        xs, ys = _series(pr, lambda r, k=key: r["best_dense_ms"] / C.best_ms(r, k)
                                         if C.best_ms(r, k) and r.get("best_dense_ms") else None)
                    else:
                        xs, ys = _series(pr, lambda r, k=key: r["floor_sparse_ms"] / C.best_ms(r, k)
                                         if C.best_ms(r, k) else None)
                    if xs:
                        ax.plot(xs, ys, "o-", color=COLORS[color], label=label, ms=3)
                if what == "speedup":
                    xs, ys = _series(pr, lambda r: r["best_dense_ms"] / r["floor_sparse_ms"]
                                     if r.get("best_dense_ms") else None)
                    ax.plot(xs, ys, "--", color="k", lw=0.8, label="ideal (dense / sparse floor)")
                    ax.axhline(1.0, color="k", lw=0.5)
                    ax.set_yscale("log")
                else:
                    ax.axhline(1.0, color="k", lw=0.5)
                    ax.set_ylim(0, max(1.1, ax.get_ylim()[1]))
                arows = [a for a in official if a["batch"] == b and a["seqlen"] == t]
                if arows:
                    fn = ((lambda a: a["sdpa_flash_dense_ms"] / a["off_tilelang_ms"]) if what == "speedup"
                          else (lambda a: a["floor_sparse_ms"] / a["off_tilelang_ms"]))
                    ax.plot([a["sparsity"] for a in arows], [fn(a) for a in arows], "s", mfc="none",
                            color="tab:orange", label="official TileLang (anchor)")
                frows = [a for a in flex_anchor if a["batch"] == b and a["seqlen"] == t and "flex_sparse_ms" in a]
                if frows:
                    fn = ((lambda a: a["sdpa_flash_dense_ms"] / a["flex_sparse_ms"]) if what == "speedup"
                          else (lambda a: a["floor_sparse_ms"] / a["flex_sparse_ms"]))
                    ax.plot([a["sparsity"] for a in frows], [fn(a) for a in frows], "^", mfc="none",
                            color="tab:green", label="flex block-sparse (anchor)")
                if i == len(batches) - 1:
                    ax.set_xlabel("sparsity")
        handles, labels = {}, []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        labels = list(handles)
        fig.legend([handles[k] for k in labels], labels, loc="lower center", ncol=min(len(labels), 4),
                   fontsize=8)
        paths.append(_save(fig, out_dir, f"decode-{what}-{slug}.png", bottom=0.1 / len(batches) ** 0.5))
    return paths


def plot_gate(data: dict, out_dir: Path) -> list[Path]:
    rows, info = data["rows"], data["info"]
    present = {k.split("_")[0] for r in rows for k in r if k.endswith("_gate_share")}
    backend = next((b for b in SEERATTN_ORDER if b in present), None)
    if backend is None:
        return []
    batches, tokens = _grid(rows)
    fig, axes = _panels(1, len(batches), f"{info.get('gpu') or 'CPU'}: gate share of the attention "
                        f"layer's decode time ({backend})")
    cmap = plt.get_cmap("viridis")
    for j, b in enumerate(batches):
        ax = axes[0][j]
        ax.set_title(f"batch {b}", fontsize=9)
        for k, t in enumerate(tokens):
            pr = [r for r in rows if r["batch"] == b and r["tokens"] == t]
            color = cmap(k / max(1, len(tokens) - 1))
            xs, ys = _series(pr, lambda r: r.get(f"{backend}_gate_share"))
            ax.plot(xs, [100 * y for y in ys], "o-", color=color, ms=3, label=_tok(t))
            xs, ys = _series(pr, lambda r: r.get(f"{backend}_gate_share_amortised"))
            ax.plot(xs, [100 * y for y in ys], "--", color=color, lw=0.8)
            xs, ys = _series(pr, lambda r: r.get(f"{backend}_gate_share_step"))
            ax.plot(xs, [100 * y for y in ys], ":", color=color, lw=1.2)
        ax.axhline(10, color="r", lw=0.6, ls=":")
        ax.set_xlabel("sparsity")
        if j == 0:
            ax.set_ylabel("gate share %\n(-- amortised, : in one graph)")
    axes[0][-1].legend(fontsize=7, title="tokens", title_fontsize=7)
    return [_save(fig, out_dir, f"gate-share-{C.gpu_slug(info)}.png")]


def _e2e_order(series: str) -> tuple:
    """Sort key of an e2e series ``"<label> <mode>"``: by mode, then dense methods before
    sparse ones, then token budget (``seerattn-<budget>``) ascending."""
    label, mode = series.split()
    budget = label.rsplit("-", 1)[-1]
    return mode, not label.startswith("dense"), int(budget) if budget.isdigit() else 0


def plot_e2e(data: dict, out_dir: Path) -> list[Path]:
    rows = [dict(r, series=f"{r['label']} {r['mode']}") for r in data["rows"] if r.get("tok_s")]
    info = data["info"]
    contexts = sorted({r["context"] for r in rows})
    # One colour per (method, mode) across every panel.
    series = sorted({r["series"] for r in rows}, key=_e2e_order)
    cmap = plt.get_cmap("tab10")
    colors = {s: cmap(i % 10) for i, s in enumerate(series)}
    fig, axes = _panels(1, len(contexts), f"{info.get('gpu') or 'CPU'}: decode tokens/s, "
                        f"{rows[0].get('model', 'model') if rows else 'model'} (black ticks: bandwidth floor)")
    anchor = None
    if ANCHORS.exists() and info.get("gpu"):
        with open(ANCHORS) as fh:
            e2e = json.load(fh)["transformers_dense_e2e"]
        anchor = next((v for k, v in e2e.items() if k in info["gpu"].lower()), None)
    width = 0.8 / max(1, len(series))
    batches = sorted({r["batch"] for r in rows})  # the panels share their x axis
    for j, ctx in enumerate(contexts):
        ax = axes[0][j]
        pr = [r for r in rows if r["context"] == ctx]
        for k, name in enumerate(series):
            hits = [(i, r) for i, b in enumerate(batches) for r in pr if r["series"] == name and r["batch"] == b]
            if not hits:
                continue
            xs = [i + k * width for i, _ in hits]
            ax.bar(xs, [r["tok_s"] for _, r in hits], width, color=colors[name], label=name)
            ax.hlines([r["floor_tok_s"] for _, r in hits if r.get("floor_tok_s")],
                      [x - width / 2 for x, (_, r) in zip(xs, hits) if r.get("floor_tok_s")],
                      [x + width / 2 for x, (_, r) in zip(xs, hits) if r.get("floor_tok_s")], colors="k", lw=1.0)
        if anchor and ctx == 32768 and 4 in batches:
            ax.plot(batches.index(4) + 0.4, anchor["compiled_tok_s"], "*", color="k", ms=9,
                    label="stock transformers compiled (anchor)")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_title(f"{_tok(ctx)} context", fontsize=9)
        ax.set_yscale("log")
        if j == 0:
            ax.set_ylabel("tokens/s")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 4), fontsize=7)
    return [_save(fig, out_dir, f"e2e-{C.gpu_slug(info)}.png", bottom=0.2)]


PLOTTERS = {"decode": plot_decode, "gate": plot_gate, "e2e": plot_e2e}


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("--out-dir", type=Path, default=C.RESULTS_DIR)
    args = p.parse_args(argv)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for path in args.results:
        data = C.load_results(path)
        groups[(data["bench"], data["info"].get("gpu"))].append(data)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (bench, _), parts in groups.items():
        paths += PLOTTERS[bench](C.merge_results(parts), args.out_dir)
    return paths


if __name__ == "__main__":
    main()
