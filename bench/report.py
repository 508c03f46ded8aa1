"""The tables, ratios and chart that ``bench.throughput`` prints and draws.

Pure formatting of measurements already taken: one ``Row`` per variant
(measured, or the reason it was not), rooflines per precision, accuracy
against the float32 reference.  Kept apart from the runs so that it can be
checked on made-up numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

# Ratios printed side by side: (label, numerator, denominator candidates:
# the first measured one is used; several = "the best of").
RATIOS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("ours(auto) / torch bf16", "ours_auto", ("torch_bf16",)),
    ("ours(auto) / ours f32+XLA today", "ours_auto", ("ours",)),
    ("ours(auto) / torch f32", "ours_auto", ("torch_f32",)),
    ("int8 / our bf16", "ours_ov_int8", ("ours_ov_bf16", "ours_tf_bf16")),
    ("ours f32+XLA / baseline", "ours", ("baseline",)),
    ("ours f32+XLA / peer", "ours", ("peer",)),
)

SHORT_PRECISION = {"float32": "f32", "bfloat16": "bf16", "int8": "int8",
                   "auto": "auto"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One variant's line of the table.

    ``status`` is None for a measured variant, else why it has no numbers
    ("not measurable on this CPU: ...", "not available in this build:
    ...", "failed: ...").  Rates are real (unpadded) tokens per second;
    shares are of the roofline at the variant's precision (None where that
    roofline was not measured).
    """
    name: str
    label: str
    engine: str
    precision: str
    status: Optional[str] = None
    docs_per_s: float = 0.0
    e2e_tokens_per_s: float = 0.0
    model_tokens_per_s: float = 0.0
    padding: float = 0.0
    peak_rss_mib: float = 0.0
    wall_s: float = 0.0
    e2e_share: Optional[float] = None
    model_share: Optional[float] = None
    precision_assumed: bool = False

    @property
    def measured(self) -> bool:
        return self.status is None


def _percent(share: Optional[float]) -> str:
    return "-" if share is None else f"{share:.1%}"


def format_table(rows: Sequence[Row]) -> list[str]:
    """The speed table: one line per variant, measured or not."""
    width = max([len(r.label) for r in rows] + [7])
    lines = [f"{'variant':<{width}} {'engine':<10} {'prec':<5} "
             f"{'docs/s':>8} {'e2e tok/s':>10} {'model tok/s':>11} "
             f"{'padding':>8} {'e2e %roof':>9} {'model %roof':>11} "
             f"{'peak RSS':>10} {'wall s':>7}"]
    for r in rows:
        precision = SHORT_PRECISION.get(r.precision, r.precision) + (
            "*" if r.precision_assumed else "")
        head = f"{r.label:<{width}} {r.engine:<10} {precision:<5} "
        if not r.measured:
            lines.append(head + r.status)
            continue
        lines.append(
            head + f"{r.docs_per_s:>8.2f} {r.e2e_tokens_per_s:>10.1f} "
            f"{r.model_tokens_per_s:>11.1f} {r.padding:>8.1%} "
            f"{_percent(r.e2e_share):>9} {_percent(r.model_share):>11} "
            f"{r.peak_rss_mib:>6.0f} MiB {r.wall_s:>7.1f}")
    if any(r.precision_assumed for r in rows if r.measured):
        lines.append("* precision chosen by the run itself (auto); its "
                     "roofline share assumes it")
    return lines


def _ratio_text(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 0 else "n/a"


def format_ratios(rows: Sequence[Row]) -> list[str]:
    """Each ratio of ``RATIOS``, end to end and in model calls, or why it
    cannot be given."""
    by_name = {r.name: r for r in rows}
    width = max(len(label) for label, _, _ in RATIOS)
    lines = []
    for label, top, bottoms in RATIOS:
        measured = [by_name[b] for b in bottoms
                    if b in by_name and by_name[b].measured]
        missing = [n for n in (top,) + bottoms if n not in by_name
                   or not by_name[n].measured]
        if top not in by_name or not by_name[top].measured or not measured:
            reasons = "; ".join(
                f"{n}: {by_name[n].status if n in by_name else 'not run'}"
                for n in missing)
            lines.append(f"{label:<{width}}  n/a ({reasons})")
            continue
        bottom = max(measured, key=lambda r: r.e2e_tokens_per_s)
        top_row = by_name[top]
        which = f" (vs {bottom.name})" if len(bottoms) > 1 else ""
        e2e = _ratio_text(top_row.e2e_tokens_per_s, bottom.e2e_tokens_per_s)
        in_model = _ratio_text(top_row.model_tokens_per_s,
                               bottom.model_tokens_per_s)
        lines.append(f"{label:<{width}}  {e2e} end to end, {in_model} in "
                     f"model calls{which}")
    return lines


# The issue's targets for CPUs without native bfloat16, where auto runs
# OpenVINO at float32: (label, denominator, lowest ratio).
NON_AMX_TARGETS = (("torch f32", "torch_f32", 1.1),
                   ("ours f32+XLA", "ours", 1.0))
# Why the other class of CPU cannot be stood in for on this one.
_MLAS_UNCAPPED = (
    "OpenVINO's float32 matrix products (its MLAS kernels, 48 of BERT-Base's "
    "73 in float32) pick AVX-512 from CPUID and no setting caps them "
    "(ONEDNN_MAX_CPU_ISA=AVX2 caps only its oneDNN kernels, and makes its "
    "bfloat16 compile fail), while TensorFlow and torch could be capped: the "
    "engines would not run the same instructions")


def format_non_amx(rows: Sequence[Row], flags: frozenset[str]) -> list[str]:
    """The rows for CPUs without AMX/AVX512-BF16 (AVX-512: N2, C2; AVX2:
    N2D, C2D, T2D), where ``--engine auto`` runs OpenVINO at float32:
    ``ours_ov_f32`` against torch float32 and our float32 + XLA, with the
    issue's targets.

    float32 never runs on AMX (it has no float32 products), so this CPU's
    float32 rows stand for the AVX-512 class when it has AVX-512 (the
    AVX2 class then cannot be stood in for: ``_MLAS_UNCAPPED``), and for
    the AVX2 class when it has only AVX2.
    """
    has_avx512 = "avx512f" in flags
    measured_class = ("AVX-512 without AMX (N2, C2)" if has_avx512
                      else "AVX2 only (N2D, C2D, T2D)")
    other_class, why = (("AVX2 only (N2D, C2D, T2D)", _MLAS_UNCAPPED)
                        if has_avx512 else
                        ("AVX-512 without AMX (N2, C2)",
                         "this CPU has no AVX-512"))
    by_name = {r.name: r for r in rows}
    lines = [f"CPUs without AMX/AVX512-BF16 (auto runs OpenVINO float32 "
             f"there; float32 never runs on AMX, so this CPU's float32 rows "
             f"stand for {measured_class}):"]
    auto = by_name.get("ours_ov_f32")
    for label, name, target in NON_AMX_TARGETS:
        bottom = by_name.get(name)
        head = f"  {measured_class}: ours(auto) / {label}"
        if auto is None or bottom is None or not (auto.measured
                                                  and bottom.measured):
            missing = [f"{n}: {by_name[n].status if n in by_name else 'not run'}"
                       for n in ("ours_ov_f32", name)
                       if n not in by_name or not by_name[n].measured]
            lines.append(f"{head}  n/a ({'; '.join(missing)})")
            continue
        ratio = auto.e2e_tokens_per_s / bottom.e2e_tokens_per_s
        lines.append(
            f"{head}  {ratio:.2f}x end to end, "
            f"{_ratio_text(auto.model_tokens_per_s, bottom.model_tokens_per_s)}"
            f" in model calls; target >= {target}x: "
            f"{'met' if ratio >= target else 'NOT met'}")
    lines.append(f"  {other_class}: not measurable on this CPU: {why}")
    return lines


def format_rooflines(gflops: Mapping[str, Mapping[str, float]],
                     tokens_per_s: Mapping[str, float],
                     mflops_per_token: float,
                     unmeasurable: Mapping[str, str]) -> list[str]:
    """Matmul GFLOP/s per engine and precision, and the roofline (best
    engine) in tokens/s per precision."""
    precisions = ("float32", "bfloat16", "int8")
    lines = [f"{'matmul GFLOP/s':<16}" + "".join(
        f"{SHORT_PRECISION[p]:>10}" for p in precisions)]
    for engine, rates in gflops.items():
        lines.append(f"{engine:<16}" + "".join(
            f"{rates[p]:>10.1f}" if p in rates else f"{'-':>10}"
            for p in precisions))
    for precision in precisions:
        if precision in tokens_per_s:
            best = max((r[precision], e) for e, r in gflops.items()
                       if precision in r)
            lines.append(
                f"roofline {SHORT_PRECISION[precision]}: {best[0]:.1f} "
                f"GFLOP/s ({best[1]}) / {mflops_per_token:.1f} MFLOP/token "
                f"= {tokens_per_s[precision]:.0f} tokens/s")
        else:
            lines.append(f"roofline {SHORT_PRECISION[precision]}: "
                         + unmeasurable.get(precision, "not measured"))
    return lines


def format_accuracy(accuracy: Mapping[str, Mapping[str, Any]],
                    labels: Mapping[str, str], min_docs: int) -> list[str]:
    """Accuracy per variant against the float32 reference."""
    width = max([len(labels.get(n, n)) for n in accuracy] + [7])
    lines = [f"{'variant':<{width}} {'docs':>6} {'pooled cos min':>15} "
             f"{'mean':>9} {'mean-seq cos min':>17} {'mean':>9} "
             f"{'max|err| pooled':>16} {'max|err| seq':>13} "
             f"{'token diffs':>11}"]
    for name, a in accuracy.items():
        label = labels.get(name, name)
        if "error" in a:
            lines.append(f"{label:<{width}} {a['error']}")
            continue
        lines.append(
            f"{label:<{width}} {a['docs']:>6} {a['pooled_cos_min']:>15.6f} "
            f"{a['pooled_cos_mean']:>9.6f} {a['mean_cos_min']:>17.6f} "
            f"{a['mean_cos_mean']:>9.6f} {a['max_abs_pooled']:>16.2e} "
            f"{a['max_abs_sequence']:>13.2e} {a['token_diffs']:>11}")
    few = [labels.get(n, n) for n, a in accuracy.items()
           if "docs" in a and a["docs"] < min_docs]
    if few:
        lines.append(f"note: under {min_docs:,} documents compared for "
                     f"{', '.join(few)} (run with more --docs for the "
                     "accuracy figure)")
    return lines


def write_chart(rows: Sequence[Row], rooflines: Mapping[str, float],
                title: str, path: str) -> None:
    """A PNG bar chart of the table: real tokens/s end to end and in model
    calls per variant, the rooflines as dashed lines, and the reason in
    place of the bars of a variant that was not measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    height = 1.2 + 0.45 * len(rows)
    figure, axes = plt.subplots(figsize=(11, height), dpi=100)
    positions = list(range(len(rows)))[::-1]
    e2e = [r.e2e_tokens_per_s if r.measured else 0 for r in rows]
    model = [r.model_tokens_per_s if r.measured else 0 for r in rows]
    axes.barh([p + 0.2 for p in positions], model, height=0.38,
              color="#9ecae1", label="model calls")
    axes.barh([p - 0.2 for p in positions], e2e, height=0.38,
              color="#3182bd", label="end to end")
    top = max(e2e + model + list(rooflines.values()) + [1.0])
    for row, position in zip(rows, positions):
        if not row.measured:
            axes.text(top * 0.01, position, row.status[:90], va="center",
                      fontsize=8, color="#a50f15")
        else:
            axes.text(row.e2e_tokens_per_s, position - 0.2,
                      f" {row.e2e_tokens_per_s:,.0f}", va="center",
                      fontsize=7)
    styles = {"float32": "#636363", "bfloat16": "#e6550d",
              "int8": "#31a354"}
    for precision, rate in rooflines.items():
        short = SHORT_PRECISION.get(precision, precision)
        axes.axvline(rate, linestyle="--", linewidth=1,
                     color=styles.get(precision, "black"),
                     label=f"roofline {short}")
    axes.set_yticks(positions)
    axes.set_yticklabels([r.label for r in rows], fontsize=8)
    axes.set_xlim(0, top * 1.12)
    axes.set_xlabel("real tokens/s")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
