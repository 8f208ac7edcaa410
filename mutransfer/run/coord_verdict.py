"""Coordinate check, verdict: pure functions from the measured runs to one flag per row and one verdict,
each with its uncertainty (docs/verdicts.md has the reasoning and the calibration).

Row = (module, act | update) or (parameter, ‖W₀‖ | ‖ΔW·x‖ | ‖ΔW‖). Its slope is the least-squares slope
of log(value at the last step, averaged over seeds) against log(width), over the widths it is judged on.
Its standard error `se` is the larger of
  - the seeds' : sd of the per-seed slopes / sqrt(seeds)                      (2 seeds or more)
  - the fit's  : residuals of the log-log line, sqrt(RSS / (W - 2) / Sxx)     (3 widths or more)
  - a prior    : SEED_SE_PRIOR / sqrt(seeds), for a check with a single seed (its spread is unknown)
The band is slope ± Z se. With T the threshold (BLOWUP_SLOPE; SPECTRAL_SLOPE both ways):
  blowup / mis-scaled   the whole band is beyond T, and the slope over the widest widths (the tail)
                        is beyond T too (a transient that stops growing is not a trend);
  ok                    the slope itself is within T, or the growth stopped at the widest widths;
  inconclusive          the slope is beyond T but the band reaches back across it: the seeds are too
                        few to tell a trend from noise; `seeds_needed` says how many would.
Vanishing (an update slope below VANISH_SLOPE, or a spectral update ratio below -SPECTRAL_SLOPE: a
warning, updates that shrink with width as in the kernel regime) needs the whole band below it.

Regime changes of the rule (min(1, √(fan_out/fan_in)) changing branch between two widths of the
ladder, `regime_changes`): the activation of the parameter's own module is judged against the rule's
own prediction (its values divided by the rule's factor at each width, so the slope compared with T
is the excess over the slope the rule predicts in each regime); every other row is judged past the
change when at least two widths remain after it, and where none can be isolated (a change between the
last two widths) a flag on those rows is reported as inconclusive with the widths to add.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..outputs_guard import marker
from .coord_attention import scale_finding
from .coord_measure import Run, Settings
from .coord_spectral import FEATURE, OPERATOR

STATS = ("act", "update")
# Thresholds on the log-log slope (value ~ width^slope), chosen from measurements (docs/verdicts.md):
# the steepest slope of a correct muP model was +0.21 (most <= +0.10); the mildest defect measured
# (1/sqrt(d_head) attention, at 10x the tuned LR) +0.36 to +0.47; SP under AdamW +0.68.
BLOWUP_SLOPE = 0.3
VANISH_SLOPE = -0.3
# the spectral check (coord_spectral.py) divides each norm by what the condition prescribes, so a
# correct parameter's slope is ~0 in either direction; |slope| beyond this is "mis-scaled" (exit 1).
SPECTRAL_SLOPE = 0.3
TAIL = 3                   # growth must persist over the widest TAIL widths to count (transients)
Z = 2.0                    # the band: slope ± Z standard errors
SEED_SE_PRIOR = 0.05       # sd of a per-seed slope assumed when there is a single seed
MAX_SEEDS = 16             # the most seeds an "inconclusive" advises
FAILING = ("blowup", "mis-scaled")
FLAGS = ("ok", "blowup", "vanishing", "mis-scaled", "inconclusive")
SPECTRAL_STATS = ("‖W₀‖", FEATURE, OPERATOR)
TINY = 1e-30               # values at or below this count as exactly zero
EXIT_CODES = {"ok": 0, "blowup": 1, "inconclusive": 3}


# ------------------------------------------------------------------------------------------ slopes

def loglog_slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(width). Values that are all ~0 give 0 (nothing
    to scale); a non-finite value gives +inf (it blew up); a zero among non-zeros gives -inf."""
    if any(not math.isfinite(v) for v in values):
        return math.inf
    if all(abs(v) <= TINY for v in values):
        return 0.0
    if any(abs(v) <= TINY for v in values):
        return -math.inf
    xs = [math.log(w) for w in widths]
    ys = [math.log(abs(v)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx


def fit_se(widths: Sequence[float], values: Sequence[float]) -> float:
    """Standard error of the log-log slope from the line's residuals (NaN below 3 points or when a
    value is zero or not finite)."""
    if len(widths) < 3 or any(not (math.isfinite(v) and abs(v) > TINY) for v in values):
        return math.nan
    xs = [math.log(w) for w in widths]
    ys = [math.log(abs(v)) for v in values]
    b = loglog_slope(widths, values)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    rss = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return math.sqrt(rss / (len(xs) - 2) / sxx)


@dataclass(frozen=True)
class Band:
    slope: float               # of the seed-averaged series
    se: float                  # its standard error (see the module's docstring)
    per_seed: tuple            # each seed's slope
    tail: Optional[float]      # slope over the widest widths (None below 3 widths)

    @property
    def low(self) -> float:
        return self.slope - Z * self.se if math.isfinite(self.slope) else self.slope

    @property
    def high(self) -> float:
        return self.slope + Z * self.se if math.isfinite(self.slope) else self.slope


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x == x]
    if any(x == math.inf for x in xs):
        return math.inf
    return sum(xs) / len(xs) if xs else math.nan


def band(widths: Sequence[int], per_seed: Sequence[Sequence[float]]) -> Band:
    """The slope and its uncertainty from per-seed series (per_seed[k][i]: seed k at widths[i]; NaN
    where missing, +inf where the run diverged)."""
    means = [_mean([s[i] for s in per_seed]) for i in range(len(widths))]
    pts = [(w, v) for w, v in zip(widths, means) if v == v]
    ws, vs = [w for w, _ in pts], [v for _, v in pts]
    slope = loglog_slope(ws, vs) if len(ws) >= 2 else math.nan
    seeds = []
    for s in per_seed:
        p = [(w, v) for w, v in zip(widths, s) if v == v]
        if len(p) >= 2:
            seeds.append(loglog_slope([w for w, _ in p], [v for _, v in p]))
    fin = [b for b in seeds if math.isfinite(b)]
    ses = [fit_se(ws, vs)]
    if len(fin) >= 2:
        m = sum(fin) / len(fin)
        ses.append(math.sqrt(sum((b - m) ** 2 for b in fin) / (len(fin) - 1) / len(fin)))
    else:
        ses.append(SEED_SE_PRIOR / math.sqrt(max(1, len(per_seed))))
    ses = [x for x in ses if x == x]
    se = max(ses) if ses else math.nan
    k = max(2, min(TAIL, len(ws) - 1))
    tail = loglog_slope(ws[-k:], vs[-k:]) if len(ws) >= 3 else None
    return Band(slope, se, tuple(seeds), tail)


def seeds_needed(b: Band, threshold: float, seeds: int) -> int:
    """Seeds for the band to clear the threshold at this slope (the seed part of se ~ 1/sqrt(seeds))."""
    d = abs(b.slope - threshold)
    if not (d > 0 and b.se == b.se):
        return MAX_SEEDS
    n = math.ceil(max(1, seeds) * (Z * b.se / d) ** 2)
    return int(min(MAX_SEEDS, max(seeds + 1, n, 2)))


def decide(statistic: str, b: Band, logits: bool = False) -> str:
    """The flag of one row from its band (module docstring)."""
    if statistic in (FEATURE, OPERATOR) and b.slope < -SPECTRAL_SLOPE:
        # an update that shrinks with width: kernel-like, a warning as for act updates (module docstring)
        return "vanishing" if b.high < -SPECTRAL_SLOPE else "ok"
    if statistic in SPECTRAL_STATS:
        t = SPECTRAL_SLOPE
        if not abs(b.slope) > t:
            return "ok"
        if b.tail is not None and not abs(b.tail) > t:
            return "ok"
        sure = b.low > t if b.slope > 0 else b.high < -t
        return "mis-scaled" if sure else "inconclusive"
    if b.slope > BLOWUP_SLOPE:
        if b.tail is not None and not b.tail > BLOWUP_SLOPE:
            return "ok"          # a finite-width transient that stopped growing
        return "blowup" if b.low > BLOWUP_SLOPE else "inconclusive"
    if statistic == "update" and b.high < VANISH_SLOPE and not logits:
        return "vanishing"       # (1/d logits start O(1/sqrt(d)) and move slowly: shrinking is expected)
    return "ok"


def flag(statistic: str, slope: float, blowup: float = BLOWUP_SLOPE, vanish: float = VANISH_SLOPE) -> str:
    """The flag of a slope known exactly (no uncertainty): blowup above the threshold, vanishing for
    update slopes below the (negative) one, else ok."""
    if slope > blowup:
        return "blowup"
    if statistic == "update" and slope < vanish:
        return "vanishing"
    return "ok"


def judged(widths: list[int], values: list[float], statistic: str, start: int = 0,
           name_is_logits: bool = False) -> tuple[float, Optional[float], str]:
    """(slope, tail slope, flag) of one single-seed series judged from index `start`."""
    ws, vs = widths[start:], values[start:]
    if len(ws) < 2:
        ws, vs = widths, values
    b = band(ws, [list(vs)])
    return b.slope, b.tail, decide(statistic, b, name_is_logits)


# ------------------------------------------------------------------------------------- regime changes

MATRIX_ROLES = ("input", "hidden", "output")


def matrix_fans(shapes: dict[int, object]) -> dict[str, dict[int, tuple[int, int]]]:
    """parameter -> width -> (fan_in, fan_out) of the matrices, from each width's traced shapes
    (engine/shapes.Shapes: `.params[name].role / .fan_in / .fan_out`)."""
    out: dict[str, dict[int, tuple[int, int]]] = {}
    for w, sh in sorted(shapes.items()):
        for n, p in sh.params.items():
            if p.role in MATRIX_ROLES:
                out.setdefault(n, {})[w] = (p.fan_in, p.fan_out)
    return out


def rule_factor(fan_in: int, fan_out: int) -> float:
    """The rule's branch, min(1, √(fan_out/fan_in)) (engine/spectral.init_std × √fan_in)."""
    return min(1.0, math.sqrt(fan_out / fan_in))


def regime_changes(fans: dict[str, dict[int, tuple[int, int]]]) -> list[tuple[str, int, int]]:
    """(parameter, width a, width b): the rule's min(1, √(fan_out/fan_in)) changes branch between
    consecutive widths a and b. `fans`: parameter -> width -> (fan_in, fan_out) of the matrices
    (roles input, hidden, output). The one home of this test (CLI and Python API)."""
    out = []
    for n, per_w in fans.items():
        seq = sorted(per_w.items())
        for (wa, (fia, foa)), (wb, (fib, fob)) in zip(seq, seq[1:]):
            if (foa >= fia) != (fob >= fib):
                out.append((n, wa, wb))
    return out


def owner(parameter: str, root: str) -> str:
    """The module a parameter belongs to, by name (the root module for a top-level parameter)."""
    return parameter.rpartition(".")[0] or root


@dataclass(frozen=True)
class Window:
    lo: int                                   # judged widths: widths[lo:hi]
    hi: int
    open_changes: tuple = ()                  # changes no side of which can be judged alone


def window(changes: list[tuple[str, int, int]], widths: list[int]) -> Window:
    """The widths every row not owning a changing parameter is judged on: past each change when at
    least two widths remain after it; a change too near the end is kept open (module docstring)."""
    lo, hi, open_ = 0, len(widths), []
    for c in changes:
        if c[2] not in widths:
            continue
        ib = widths.index(c[2])
        if len(widths) - ib >= 2:
            lo = max(lo, ib)
        else:
            open_.append(c)
    if hi - lo < 2:
        lo = 0
    return Window(lo, hi, tuple(open_))


# ------------------------------------------------------------------------------------------ result

@dataclass
class Row:
    name: str
    statistic: str
    values: list[float]          # per width, seed-averaged, at the last step
    slope: float
    spread: float                # std of the per-seed slopes
    flag: str
    series: list[list[float]] = field(default_factory=list)  # per width, seed-averaged, t = 0..steps
    tail_slope: Optional[float] = None   # over the widest widths (None with fewer than 3)
    early_slope: Optional[float] = None  # updates: the slope after the first step (before saturation)
    se: float = math.nan                 # standard error of the slope
    judged_widths: list[int] = field(default_factory=list)
    why: str = ""                        # what an inconclusive row needs, or how a regime was honoured
    seeds_needed: Optional[int] = None

    @property
    def interval(self) -> tuple[float, float]:
        if not math.isfinite(self.slope) or self.se != self.se:
            return (self.slope, self.slope)
        return (self.slope - Z * self.se, self.slope + Z * self.se)


@dataclass
class Result:
    settings: Settings
    rows: list[Row]
    diverged: list[str]
    findings: list[str] = field(default_factory=list)   # structural: wrong attention scale
    notes: list[str] = field(default_factory=list)      # regime changes of the rule inside the ladder

    @property
    def verdict(self) -> str:
        """blowup (something is confidently wrong) | inconclusive (nothing is, something may be) | ok."""
        if self.diverged or self.findings or any(r.flag in FAILING for r in self.rows):
            return "blowup"
        return "inconclusive" if any(r.flag == "inconclusive" for r in self.rows) else "ok"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def seeds_advice(self) -> Optional[int]:
        """The seeds an inconclusive check needs (the most any inconclusive row asks), or None."""
        need = [r.seeds_needed for r in self.rows if r.flag == "inconclusive" and r.seeds_needed]
        return max(need) if need else None

    @property
    def verdict_line(self) -> str:
        v = self.verdict
        if v == "inconclusive":
            n = self.seeds_advice
            widths = [r.why for r in self.rows if r.flag == "inconclusive" and "add a width" in r.why]
            return "inconclusive: " + (f"rerun with --seeds {n}" if n else "") + \
                (("; " if n else "") + widths[0] if widths else "")
        return v

    def to_json(self) -> dict:
        return to_json(self)

    @property
    def worst_first(self) -> list[Row]:
        return sorted(self.rows, key=lambda r: (-_finite_key(r.slope), r.name, r.statistic))


def _num(x: Optional[float]):
    if x is None:
        return None
    return x if math.isfinite(x) else (None if x != x else ("inf" if x > 0 else "-inf"))


def to_json(res: Result) -> dict:
    """The result as plain JSON data (what --json writes; infinities as strings, NaN as null)."""
    s = res.settings
    return {
        "written_by": marker("coord-check results"),
        "verdict": res.verdict,
        "verdict_line": res.verdict_line,
        "exit_code": res.exit_code,
        "seeds_advice": res.seeds_advice,
        "parametrization": s.parametrization,
        "optimizer": s.optimizer,
        "lr": s.lr,
        "widths": list(s.widths),
        "steps": s.steps,
        "seeds": s.seeds,
        "thresholds": {"blowup": BLOWUP_SLOPE, "vanishing": VANISH_SLOPE, "spectral": SPECTRAL_SLOPE,
                       "tail_widths": TAIL, "z": Z, "seed_se_prior": SEED_SE_PRIOR},
        "diverged": list(res.diverged),
        "findings": list(res.findings),
        "notes": list(res.notes),
        "modules": [
            {"name": r.name, "statistic": r.statistic, "values": [_num(v) for v in r.values],
             "slope": _num(r.slope), "se": _num(r.se), "interval": [_num(v) for v in r.interval],
             "tail_slope": _num(r.tail_slope), "spread": _num(r.spread), "flag": r.flag, "why": r.why,
             "seeds_needed": r.seeds_needed, "judged_widths": list(r.judged_widths),
             "series": [[_num(v) for v in ser] for ser in r.series]}
            for r in res.worst_first
        ],
    }


def _finite_key(x: float) -> float:
    return 1e300 if x == math.inf else (-1e300 if x == -math.inf else (-1e299 if x != x else x))


def _spread(b: Band) -> float:
    fin = [p for p in b.per_seed if math.isfinite(p)]
    if len(fin) < 2:
        return 0.0
    m = sum(fin) / len(fin)
    return math.sqrt(sum((p - m) ** 2 for p in fin) / len(fin))


# ------------------------------------------------------------------------------------------ verdict

class _Judge:
    """Judges rows of one check: the widths, the window and the rule's factors for regime owners."""

    def __init__(self, s: Settings, fans: Optional[dict], root: str):
        self.s, self.widths = s, list(s.widths)
        fans = fans or {}
        self.changes = regime_changes(fans)
        self.win = window(self.changes, self.widths)
        self.root = root
        # module -> per-width factor of the rule, for the owners of a changing parameter
        self.factor: dict[str, dict[int, float]] = {}
        self.param_factor: dict[str, dict[int, float]] = {}
        for n, _, _ in self.changes:
            f = self.param_factor[n] = {w: rule_factor(*fans[n][w]) for w in fans[n]}
            old = self.factor.get(owner(n, root))
            self.factor[owner(n, root)] = f if old is None else {w: old.get(w, 1.0) * f[w] for w in f}

    def notes(self) -> list[str]:
        out = []
        lo = self.widths[self.win.lo]
        for n, a, b in self.changes:
            head = f"{n}: the rule's min(1, √(fan_out/fan_in)) changes branch between widths {a} and {b}; "
            if (n, a, b) in self.win.open_changes:
                out.append(head + f"{owner(n, self.root)}'s act is also judged against the rule's own slope, and "
                           f"too few widths remain past {b} to judge the rest apart from it: add a width "
                           f"above {self.widths[-1]}")
            else:
                out.append(head + f"{owner(n, self.root)}'s act is also judged against the rule's own slope, "
                           f"other slopes from width {lo} on")
        return out

    def row(self, name: str, stat: str, per_seed: list[list[float]], logits: bool = False
            ) -> Optional[tuple[Band, str, list[int], str, Optional[int]]]:
        """(band, flag, judged widths, why, seeds needed) of one row, or None when fewer than two
        widths have a value. The act of a changing parameter's own module is judged both as measured
        (over the window) and against the rule's own slope (over the ladder): the rule predicts its init
        part, which dominates early, while its update part is Theta(1); it is flagged only when both say so."""
        ws = self.widths
        if stat in SPECTRAL_STATS:       # normalised by what the rule predicts in each regime (coord_spectral)
            return self._judge(stat, per_seed, 0, len(ws), logits)
        raw = self._judge(stat, per_seed, self.win.lo, self.win.hi, logits, downgrade=True)
        factor = self.factor.get(name) if stat == "act" else None
        if factor is None and raw is not None and raw[1] != "ok":
            # downstream of a change that cannot be isolated: the rule's own growth of that parameter's
            # output carries into the rows it feeds (unless a norm takes it out): either reading may hold
            for n, a, b in self.win.open_changes:
                f = self.param_factor[n]
                adj = self._judge(stat, [[v / f.get(w, 1.0) for w, v in zip(ws, s)] for s in per_seed], 0,
                                  len(ws), logits)
                if adj is not None and adj[1] == "ok":
                    return adj[0], "ok", adj[2], (f"judged as measured and against the rule's own growth of {n} "
                                                  f"(branch change between widths {a} and {b})"), None
        if factor is None or raw is None:
            return raw
        rule = self._judge(stat, [[v / factor.get(w, 1.0) for w, v in zip(ws, s)] for s in per_seed], 0, len(ws),
                           logits)
        if rule is None:
            return raw
        against = "judged as measured and against the rule's own slope (values ÷ min(1, √(fan_out/fan_in)))"
        if rule[1] == "ok" or raw[1] == "ok":
            b = rule[0] if rule[1] == "ok" else raw[0]
            jw = rule[2] if rule[1] == "ok" else raw[2]
            return b, "ok", jw, against, None
        if rule[1] == raw[1] == "blowup":
            return rule[0], "blowup", rule[2], against, None
        pick = raw if raw[1] == "inconclusive" else rule
        return pick[0], "inconclusive", pick[2], pick[3] + f"; {against}", pick[4]

    def _judge(self, stat: str, per_seed: list[list[float]], lo: int, hi: int, logits: bool,
               downgrade: bool = False) -> Optional[tuple[Band, str, list[int], str, Optional[int]]]:
        ws = self.widths
        jw = ws[lo:hi]
        seeds = [s[lo:hi] for s in per_seed]
        if sum(1 for i in range(len(jw)) if any(s[i] == s[i] for s in seeds)) < 2:
            return None
        b = band(jw, seeds)
        fl = decide(stat, b, logits)
        why, need = "", None
        if fl == "inconclusive":
            need = seeds_needed(b, SPECTRAL_SLOPE if stat in SPECTRAL_STATS else BLOWUP_SLOPE, self.s.seeds)
            why = f"slope {b.slope:+.2f} ± {Z * b.se:.2f} reaches the threshold: rerun with --seeds {need}"
        elif fl == "blowup" and downgrade and self.win.open_changes:
            c = self.win.open_changes[0]
            fl = "inconclusive"
            why = (f"the rule changes regime between widths {c[1]} and {c[2]} ({c[0]}): add a width above "
                   f"{ws[-1]} to judge this apart from it")
        return b, fl, jw, why, need


def _per_seed(runs: list[Run], widths: list[int], value) -> list[list[float]]:
    """per_seed[k][i] = value(run of seed k at widths[i]) (NaN when absent)."""
    seeds = sorted({r.seed for r in runs})
    by = {(r.width, r.seed): r for r in runs}
    return [[value(by[(w, k)]) if (w, k) in by else math.nan for w in widths] for k in seeds]


def verdict(runs: list[Run], s: Settings, fans: Optional[dict[str, dict[int, tuple[int, int]]]] = None,
            root: str = "<output>") -> Result:
    """Rows (module × act/update, parameter × spectral statistic) with slopes, uncertainty and flags,
    and structural findings on attention scales, from the measured runs. `fans`: parameter -> width
    -> (fan_in, fan_out) of the matrices, for the rule's regime changes (None: no regime handling)."""
    widths = list(s.widths)
    judge = _Judge(s, fans, root)
    names: list[str] = []
    for r in runs:
        for rec in r.records:
            for n in rec:
                if n not in names:
                    names.append(n)
    diverged = [f"width {r.width} seed {r.seed}: {r.reason}" for r in runs if r.diverged]
    T = s.steps
    per_w = {w: [rr for rr in runs if rr.width == w] for w in widths}
    rows = []
    for name in names:
        for si, stat in enumerate(STATS):
            def at(r: Run, t: int) -> float:       # NaN where missing, +inf where it diverged before t
                if t < len(r.records):
                    v = r.records[t].get(name)
                    return v[si] if v is not None else math.nan
                return math.inf if r.diverged else math.nan
            series = [[_mean([at(rr, t) for rr in per_w[w]]) for t in range(T + 1)] for w in widths]
            last = [ser[T] for ser in series]
            if s.depth_width and any(v != v for v in last):
                continue        # a depth ladder judges the modules every depth has (the first blocks, the rest)
            logits = name.endswith(":attn-logits")
            got = judge.row(name, stat, _per_seed(runs, widths, lambda r: at(r, T)), logits)
            if got is None:
                continue
            b, fl, jw, why, need = got
            early = None
            if stat == "update" and T >= 2:
                e = judge.row(name, stat, _per_seed(runs, widths, lambda r: at(r, 1)), logits)
                if e is not None:
                    early = e[0].slope
                    if e[1] == "blowup" and fl != "blowup":
                        fl, why, need = "blowup", "grows right after the first step (a trend, not saturation)", None
            rows.append(Row(name, stat, last, b.slope, _spread(b), fl, series, b.tail, early, b.se, jw, why, need))
    rows += _spectral_rows(runs, s, judge)
    return Result(s, rows, diverged, _findings(runs), judge.notes())


def _spectral_rows(runs: list[Run], s: Settings, judge: _Judge) -> list[Row]:
    """The spectral condition per parameter: ‖W₀‖ and the update's ratio, every seed."""
    widths = list(s.widths)
    ok_runs = [r for r in runs if r.spectral and not r.diverged]
    params = sorted({n for r in ok_runs for n in r.spectral})
    rows = []
    for n in params:
        kinds = {r.spectral[n][2] if len(r.spectral[n]) > 2 else OPERATOR for r in ok_runs if n in r.spectral}
        for si, stat in ((0, "‖W₀‖"), (1, FEATURE if kinds == {FEATURE} else OPERATOR)):
            per_seed = _per_seed(ok_runs, widths, lambda r: r.spectral[n][si] if n in r.spectral else math.nan)
            present = [i for i in range(len(widths)) if any(k[i] == k[i] for k in per_seed)]
            if s.depth_width and len(present) < len(widths):
                continue
            if si == 0 and all(not (v > TINY) for k in per_seed for v in k if v == v):
                continue        # a zero-initialised matrix is judged on its update only
            got = judge.row(n, stat, per_seed)
            if got is None:
                continue
            b, fl, jw, why, need = got
            vals = [_mean([k[i] for k in per_seed]) for i in range(len(widths))]
            rows.append(Row(n, stat, vals, b.slope, _spread(b), fl, [], b.tail, None, b.se, jw, why, need))
    return rows


def _findings(runs: list[Run]) -> list[str]:
    """Attention scales, structurally (coord_attention.scale_finding)."""
    findings = []
    for site in sorted({n for r in runs for n in r.attention}):
        per_width = {}
        for r in runs:
            if site in r.attention:
                per_width.setdefault(r.width, tuple(r.attention[site]))
        f = scale_finding(site, per_width)
        if f:
            findings.append(f)
    return findings
