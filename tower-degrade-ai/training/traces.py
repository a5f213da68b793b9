"""Traces: per-step feature series with labelled events, read from and written to CSV.

A trace CSV (one file per series; what `Recorder` writes and `evaluate.py --traces` reads):

    time_s,rate_ratio,success_rate,error_rate,timeout_rate,p50_over_sla,p99_over_sla,
    inflight_over_little,queue_delay_over_sla[,label][,ignore][,split]

- the eight feature columns (`features.FEATURES`) are required, normalised as in
  `tower_degrade::predict::features`;
- `time_s` (seconds) gives the step; without it the step is 0.5 s (the default tick);
- `label` is 1 while an incident is in progress. Without it (what `Recorder` writes), incidents
  are the SLO breaches found in the features by the rule below (`breach_events`);
- other columns (`p_anomaly`, `fault`: what the recorder adds) are ignored;
- `ignore` (optional) is 1 on ambiguous steps: never normal time, and no incident begins on
  one (an incident all ignored is none; one whose first steps are ignored begins after them);
- `split` (optional) is train / val / test per row, time-ordered; without it the whole file
  is test data (`evaluate.py`), and `train.py --traces` refuses it.
  `python traces.py split DIR [--val 0.2 --test 0.2]` adds one to every file in DIR.

A file whose class had no traffic in any step (a recorder's idle `default` class), or of a
header alone, is skipped by `read_dir`, with a note on stderr. The notes (`note`) are kept in
`NOTES` too, and the reports of `evaluate.py` and `lodo.py` list them.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import io
import os
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np

from features import (CLIP_HI, ERROR, FEATURES, INFLIGHT, N_FEATURES, NEUTRAL, P50, P99, QUEUE, RATE,
                      SUCCESS, TIMEOUT, WINDOW)
from protocol import early_targets, events_from_binary

# Recovery grace after an incident, in steps, per dataset: steps there count neither as
# incident nor as normal (a breaker recovering is not a false trip).
GRACE = {"simulated": 40, "recorded": 40, "nab": 0, "nezha": 3, "smd": 3}


def grace(tr: "Trace") -> int:
    """The trace's recovery grace: its dataset's where the harness made the trace itself
    (GRACE: simulated, nab, nezha, smd), else by its step (a 500 ms trace's is the recorder's
    40 ticks, a minute trace's 3 steps), whatever its directory is called: your traces in a
    directory named `nab` are not scored by NAB's rules."""
    if not tr.meta.get("own") and tr.dataset in GRACE:
        return GRACE[tr.dataset]
    return GRACE["recorded"] if tick_scale(tr.step_seconds) else 3
# Horizons, in steps. The protocol's 3, 6 and 12 steps were set for 1-5 minute steps (3 minutes
# to an hour ahead). At a 500 ms tick they are 1.5-6 s, shorter than most incidents' precursors
# last, so a warning 10 s ahead would count as a false trip: 500 ms traces are also scored at
# 20 and 60 ticks (10 s, 30 s), and the model learns the 20-tick horizon on them.
HORIZONS = (3, 6, 12)
TICK_HORIZONS = HORIZONS + (20, 60)


# Steps shorter than this are scored by the tick rules (grace, horizons), longer by the
# minute rules: between the common scrape intervals of 15 and 30 s, not on one, so that data
# a scraper wrote a little early or late (a median step of 29.99 s, or 59.99 s) falls under
# the same rules as its interval (until 4 December it was 30 s: 29.99 s steps were ticks,
# 30 s steps minutes).
MINUTE_SCALE = 20.0


def tick_scale(step_seconds: float) -> bool:
    return step_seconds < MINUTE_SCALE


def horizons(step_seconds: float) -> tuple:
    return TICK_HORIZONS if tick_scale(step_seconds) else HORIZONS


def headline_horizon(step_seconds: float) -> int:
    """The horizon the model is trained for and the headline tables use."""
    return 20 if tick_scale(step_seconds) else 6
# The SLO breach of a 500 ms trace: p99 over the SLA, or more than 5 % of calls failing,
# for at least 3 consecutive ticks.
BREACH_P99 = 1.0
BREACH_FAILED = 0.05
BREACH_TICKS = 3


@dataclass
class Trace:
    name: str
    dataset: str
    X: np.ndarray  # [T, 8] float32
    events: list  # inclusive (s, e)
    step_seconds: float
    pre_ignore: list | None = None  # per event: ambiguous steps before s - H
    val_from: int = 0  # steps [val_from, test_from) are validation
    test_from: int = 0  # steps [test_from, T) are test; [0, val_from) train
    meta: dict = field(default_factory=dict)
    ignore: np.ndarray | None = None  # [T] bool: ambiguous steps, wherever they are

    @property
    def T(self) -> int:
        return len(self.X)


def clip(X: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0), 0, CLIP_HI).astype(np.float32)


def rate_ratio(rps: np.ndarray) -> np.ndarray:
    """rps over the mean of the previous (up to) 64 steps, as the Rust feature history does.

    A missing rate (NaN: a scrape that failed) is missing in its own row only, which a trace
    file then refuses until filled in or dropped; the mean of the rows after it is over the
    rates the window has. A negative or infinite rate is refused (ValueError, naming its row
    from 0): a rate from a counter that was reset (a process restart) is to be computed from
    the counter's value after the reset, as Prometheus's `rate()` does."""
    rps = np.asarray(rps, dtype=float)
    bad = np.flatnonzero(np.isinf(rps) | (rps < 0))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"rate_ratio: the rate in row {i} (from 0) is {rps[i]:g}, and {len(bad)} in all are "
            "negative or infinite: a rate is a number of calls a second, at least 0 (a counter "
            "reset, a process restarting, gives a negative difference: take the counter's value "
            "after the reset as the increase, as Prometheus's rate() does)"
        )
    seen = ~np.isnan(rps)
    c = np.concatenate([[0.0], np.cumsum(np.where(seen, rps, 0.0))])
    k = np.concatenate([[0], np.cumsum(seen)])
    t = np.arange(len(rps))
    lo = np.maximum(0, t - WINDOW)
    n = k[t] - k[lo]
    mean = np.where(n > 0, (c[t] - c[lo]) / np.maximum(n, 1), rps)
    return np.clip(rps / np.maximum(mean, 1.0), 0, 10)


BREACH_MERGE = 20  # breaches closer than 20 steps (10 s at 500 ms) are one incident


def breach_events(X: np.ndarray) -> list:
    """Incidents of a 500 ms trace from its features: the SLO-breach rule above; a breach that
    flaps is one incident."""
    bad = (X[:, P99] > BREACH_P99) | ((1 - X[:, SUCCESS]) > BREACH_FAILED)
    runs = [(s, e) for s, e in events_from_binary(bad) if e - s + 1 >= BREACH_TICKS]
    out: list = []
    for s, e in runs:
        if out and s - out[-1][1] <= BREACH_MERGE:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


SPLITS = ("train", "val", "test")

# What reading the traces noted (units, steps, files skipped): each note is printed on stderr
# as it is found and kept here, so that a report carries it beside the numbers it changes
# (evaluate.py writes them into its report).
NOTES: list = []


def note(text: str) -> None:
    """Say `text` on stderr and keep it in NOTES."""
    print(text, file=sys.stderr)
    NOTES.append(text)


def missing_out_dir(**paths) -> str | None:
    """What is wrong with the files a tool is to write, before it runs (a training or a scoring
    can take minutes to an hour): the first flag whose file's directory does not exist, said
    as `--flag PATH: the directory D does not exist`, or whose path is a directory (a file was
    written there only once the work was done, and failed); None when all are fine. `paths`:
    the flags' names (`_` for `-`) and their paths, None for a flag not given."""
    for flag, path in paths.items():
        if path is None:
            continue
        name = f"--{flag.replace('_', '-')} {path}"
        if os.path.isdir(path):
            return f"{name}: a directory; name a file in it"
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            return f"{name}: the directory {d} does not exist"
    return None


def notes_section(notes: list) -> str:
    """A report's section listing `notes` (NOTES), or nothing where there are none."""
    if not notes:
        return ""
    return ("## Notes on the input\n\nWhat reading it noted (also said on stderr): each can change "
            "what the numbers below mean.\n\n" + "\n".join(f"- {t}" for t in notes) + "\n")


# A file is read a chunk of rows at a time, each column of a chunk parsed at once: a row held
# as a dict of strings took about 2 kB, so a week of 500 ms ticks (1.2 million rows) took
# gigabytes before a value was read; the features' per-value checks took most of the time.
CHUNK_ROWS = 1 << 16
CHUNK_CELLS = 1 << 20


def _plain(text: str) -> bool:
    """Whether `text` holds no character Python's float() reads that a number written in
    ASCII never has: a `_` between digits (float("2_5") is 25) or another script's digits
    (float("\u0663") is 3)."""
    return text.isascii() and "_" not in text


def _number(v: str) -> float:
    if not _plain(v):
        raise ValueError(f"not a number: {v!r} (a number is written with ASCII digits, a point "
                         "and an exponent, no `_`)")
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"not a number: {v!r}") from None
    if not np.isfinite(x):
        raise ValueError(f"not a finite number: {v!r}")
    return x


# How far below 0 a feature may be and still be read (as 0): a rounding of 0, such as
# 1 - success - timeout gives in floating point; as far as a share may be above 1.
ROUNDING = 1e-6


def _feature(v: str) -> float:
    x = _number(v)
    if x < -ROUNDING:  # not a rounding of 0
        raise ValueError(f"negative: {v!r} (the features are rates and ratios, 0 or more)")
    return max(x, 0.0)


# The features that are shares of calls, 0..1.
FRACTIONS = ("success_rate", "error_rate", "timeout_rate")


def _fraction(v: str) -> float:
    x = _feature(v)
    if x > 1 + ROUNDING:  # not a rounding of 1
        raise ValueError(f"above 1: {v!r} (a rate is a share of calls, 0..1, not a percentage)")
    return x


def _flag(v: str) -> int:
    if v in ("0", "1", "0.0", "1.0"):
        return int(float(v))
    raise ValueError(f"expected 0 or 1, found {v!r}")


def _split(v: str) -> int:
    """The index of a row's part in SPLITS."""
    if v in SPLITS:
        return SPLITS.index(v)
    raise ValueError(f"expected one of {', '.join(SPLITS)}, found {v!r}")


# What read_csv reads of each column it knows, in the order a chunk's columns are checked:
# the parser of one value (which says why a value is refused) and, for the numbers, the same
# rule over a parsed array (False where refused), so that a chunk passes at once and only a
# chunk with a refused value is parsed again value by value to name it.
COLUMNS = {
    **{c: (_fraction, lambda x: np.isfinite(x) & (x >= -ROUNDING) & (x <= 1 + ROUNDING)) if c in FRACTIONS
       else (_feature, lambda x: np.isfinite(x) & (x >= -ROUNDING)) for c in FEATURES},
    "time_s": (_number, np.isfinite),
    "label": (_flag, None),
    "ignore": (_flag, None),
    "split": (_split, None),
}


# What a refused time_s is told (a date or a time of day is the usual mistake).
_TIME_HINT = " (time_s is seconds as a number, e.g. Unix epoch seconds, not a date)"


# Why a column's own name is refused as its value: a second header.
OWN_NAME = "the column's own name"


def _column(lines: list, values: list, col: str) -> tuple:
    """A chunk's values of `col` (`lines`: their line numbers) as COLUMNS reads them, and the
    values it refuses, (line, why) each, in line order (then the array is None)."""
    parse, ok = COLUMNS[col]
    if ok is not None:
        try:
            # float() of each, as _number, which also refuses what _plain does
            x = np.array(values, dtype=float) if _plain("".join(values)) else None
        except ValueError:
            x = None
        if x is not None and ok(x).all():
            return x, []
    out, refused = [], []
    for line, v in zip(lines, values):
        if v.strip().lower() == col:
            refused.append((line, OWN_NAME))  # a second header (_refusal)
            continue
        try:
            out.append(parse(v.strip()))
        except ValueError as e:
            refused.append((line, f"{e}{_TIME_HINT if col == 'time_s' else ''}"))
    if refused:
        return None, refused
    return np.array(out, dtype=float if ok is not None else np.int8), []


def _refusal(path: str, refused: list, whole: bool, rows: int = 0) -> ValueError:
    """The error for a file's refused values, (line, column, why) each: the first by line, and
    how many there are (`whole`: in the whole file, else in the part read; `rows`: the rows
    read)."""
    refused.sort()
    line, col, why = refused[0]
    if why == OWN_NAME:
        return ValueError(f"{path}:{line}: the header again (files joined into one, each with its "
                          "header? keep the first header only)")
    more = ""
    if len(refused) > 1:
        # Percentages are refused on every row: they are to be divided, not dropped.
        every = whole and len(refused) == rows and all(c == col for _, c, _ in refused)
        fix = ("divide the column by 100" if "not a percentage" in why
               else "every row's: the column is in another format, convert it" if every
               else f"write one of {', '.join(SPLITS)} in each row" if col == "split"
               else "fill them in or drop their rows")
        more = (f" ({'' if whole else 'at least '}{len(refused)} values cannot be read in all, in "
                f"lines {line}-{refused[-1][0]}{'' if whole else ' and on'}: {fix})")
    return ValueError(f"{path}:{line}: column {col}: {why}{more}")


class NoRows(ValueError):
    """A trace CSV with a header and no row (a class that has not run a tick yet)."""


@contextlib.contextmanager
def _rows(path: str):
    """A trace CSV's header (names stripped, empty ones at its end left out), the line it ends
    on, and its rows in chunks of at most CHUNK_ROWS rows and CHUNK_CELLS fields (line numbers,
    rows as lists of fields), blank lines left out; an error naming the file
    and line for what cannot be read as one: not UTF-8, no header, a column named twice, a
    row with fields missing or with more than the header names (its
    values would sit under the wrong names; empty ones past the header, a trailing comma, are
    let through), no row."""
    # utf-8-sig: a byte-order mark (a spreadsheet's export) is not part of the first name
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        with _read_errors(path):
            header = next(reader, None)
            while header is not None and _blank(header):
                header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file (expected a header: time_s,{','.join(FEATURES)})")
        at = reader.line_num
        header = [h.strip() for h in header]
        while header and not header[-1]:  # a trailing comma: the rows may have it or not
            header.pop()
        if not header:
            raise ValueError(f"{path}:{at}: the header names no column (expected time_s,"
                             f"{','.join(FEATURES)})")
        seen = set()
        twice = next((h for h in header if h and (h in seen or seen.add(h))), None)
        if twice is not None:
            cols = [i + 1 for i, h in enumerate(header) if h == twice]
            raise ValueError(f"{path}:{at}: column {twice} appears {len(cols)} times (columns "
                             f"{', '.join(map(str, cols))}): which one is meant cannot be told")
        yield header, at, _chunks(path, reader, len(header))


@contextlib.contextmanager
def _read_errors(path: str):
    try:
        yield
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{_not_utf8(path)}; save it as UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a CSV file ({e})") from None


def _not_utf8(path: str) -> str:
    """Where `path` first stops being UTF-8: "LINE: not UTF-8 text (byte B: why)", B counted
    from the start of the file (the text reader's own error counts from its buffer's)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    at = newlines = 0  # bytes and line breaks before the block
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # an unfinished character from the block before
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                start = max(at - pending + e.start, 0)
                newlines += block.count(b"\n", 0, max(start - at, 0))
                return f"{newlines + 1}: not UTF-8 text (byte {start}: {e.reason})"
            if not block:
                return " not UTF-8 text"  # not reached: the reader and this decoder agree
            newlines += block.count(b"\n")
            at += len(block)


def _blank(fields: list) -> bool:
    """A blank line, or one of spaces only."""
    return not fields or (len(fields) == 1 and not fields[0].strip())


def _chunks(path: str, reader, n: int):
    lines, rows, any_row = [], [], False
    limit = max(1, min(CHUNK_ROWS, CHUNK_CELLS // n))  # a wide file's chunk holds fewer rows
    with _read_errors(path):
        end = reader.line_num  # the header's last line
        for fields in reader:
            # A quoted field may hold line breaks: a row starts on the line after the last one's end.
            line, end = end + 1, reader.line_num
            if _blank(fields):
                continue
            if len(fields) < n or any(v.strip() for v in fields[n:]):
                cut = " (a row cut short, as a crash leaves the last one, can be deleted)" \
                    if len(fields) < n else ""
                raise ValueError(f"{path}:{line}: {len(fields)} fields, the header has {n}{cut}")
            lines.append(line)
            rows.append(fields)
            if len(rows) == limit:
                yield lines, rows
                lines, rows, any_row = [], [], True
    if rows:
        yield lines, rows
    elif not any_row:
        raise NoRows(f"{path}: a header and no rows")


def _check_header(path: str, header: list, at: int) -> None:
    """The eight feature columns are in `header` (line `at`), else an error naming why: columns
    separated by tabs or semicolons, or those missing and any there in other case. A column
    the harness reads besides them (time_s, label, ignore, split) in other case is refused
    too: read as an unknown column, a `Label` would leave the incidents to the breach rule."""
    missing = [c for c in FEATURES if c not in header]
    if not missing:
        known = {c.lower(): c for c in COLUMNS if c not in FEATURES}
        for h in header:
            meant = known.get(h.strip().lower())
            if meant is None or h in COLUMNS:
                continue
            if meant not in header:
                raise ValueError(f"{path}:{at}: column {h!r} would not be read: the columns' names "
                                 f"are lower case, without spaces ({meant!r})")
            note(f"{path}:{at}: column {h!r} is not read ({meant!r} is)")
        return
    seps = [what for sep, what in (("\t", "tabs"), (";", "semicolons")) if any(sep in h for h in header)]
    if seps:
        raise ValueError(f"{path}:{at}: the header has {' and '.join(seps)} in it: the columns must be "
                         "separated by commas")
    lower = {h.lower(): h for h in header}
    other = [lower[c] for c in missing if c in lower]
    case = f" (names are lower case: found {', '.join(other)})" if other else ""
    # A name with more to it (units, a suffix: `p99_over_sla (ratio)`): the name alone is read.
    near = [f"{h!r} for {c}" for c in missing if c not in lower
            for h in header if h.strip().lower().startswith(c) and h.strip().lower() != c]
    near = f" (found {', '.join(near)}: name the column exactly)" if near else ""
    mapping = (" (a monitoring export's columns are computed into these: docs/predictor.md, "
               "*Retraining on your own traces*, step 1)" if len(missing) == len(FEATURES) and not other else "")
    raise ValueError(f"{path}:{at}: missing column(s) {', '.join(missing)}{case}{near}{mapping}")


def check_rows(path: str) -> int:
    """The number of rows of a trace CSV, read as `read_csv` reads its header (the feature
    columns there) and its rows (the errors of `_rows`); its values are not read."""
    with _rows(path) as (header, at, chunks):
        _check_header(path, header, at)
        return sum(len(lines) for lines, _ in chunks)


def read_csv(path: str, dataset: str = "recorded") -> Trace:
    """One trace CSV (the format above). Bad input is refused with the file, line and column:
    a value that is not a finite number, a negative feature (below 0 by more than a rounding,
    ROUNDING: one within it is read as 0), a success, error or timeout rate above 1 (a
    percentage), a column named twice, a column the harness reads besides the features
    (label, split, ignore, time_s) in other case, a label or ignore flag other than 0
    or 1, a split other than train / val / test or out of time order, a row with fields
    missing or more fields than the header names, a file that is not UTF-8, time that does
    not move forward, a step over an hour (time_s in milliseconds?); the first such value by line,
    with how many there are. A step of 100 s or more and not whole minutes is noted (`note`), as
    are a file without time_s (read as 500 ms steps), success, error and timeout rates over 1
    together, and a column mostly over its clip. Features above the range the Rust feature code
    clips them to are clipped as it does (`features.CLIP_HI`). Uneven steps are taken one row
    per step, with a note."""
    with _rows(path) as (header, at, chunks):
        _check_header(path, header, at)
        read = [c for c in COLUMNS if c in header]
        index = [header.index(c) for c in read]
        parts = {c: [] for c in read}
        line_parts, refused, whole = [], [], True
        for lines, rows in chunks:
            line_parts.append(np.array(lines, dtype=np.int64))
            for c, j in zip(read, index):
                x, bad = _column(lines, [r[j] for r in rows], c)
                parts[c].append(x)
                refused += [(line, c, why) for line, why in bad]
            if len(refused) > 100_000:  # enough to say where, and how many at least
                whole = False
                break
        if refused:
            raise _refusal(path, refused, whole, sum(len(p) for p in line_parts))
    line_of = np.concatenate(line_parts)
    col = {c: np.concatenate(v) for c, v in parts.items()}
    X = np.stack([col[c] for c in FEATURES], axis=1)
    # A column over its ceiling most of the time is in other units (milliseconds, raw requests
    # per second): clipped, it is a constant, and its breaches are everywhere.
    over = (X > CLIP_HI).mean(axis=0)
    for c, share in zip(FEATURES, over):
        if share >= 0.5 and CLIP_HI[FEATURES.index(c)] > 1:
            note(f"{path}: column {c} is over {CLIP_HI[FEATURES.index(c)]:g}, where it is clipped, in "
                 f"{share:.0%} of rows: is it normalised as the Rust features are (features.py; "
                 "a latency over the SLA, not in milliseconds; a rate over its baseline)?")
    # A channel at one value in every row is most likely one the export did not have, filled:
    # at another level than a healthy class's, the model reads it as one it was not trained on.
    # (An idle class is skipped, not judged; a runtime's queueing and in-flight calls are 0 in
    # every tick of a class that never waits or is quiet, which is what the model is fed.)
    if len(X) >= WINDOW and X[:, RATE].any():
        flat = [j for j in range(N_FEATURES) if (X[:, j] == X[0, j]).all()
                and not np.isclose(X[0, j], float(NEUTRAL[j]), rtol=0, atol=1e-6)
                and not (j in (INFLIGHT, QUEUE) and X[0, j] == 0)]
        if flat:
            note(f"{path}: " + ", ".join(f"column {FEATURES[j]} is {X[0, j]:g}" for j in flat)
                 + " in every row: if the export did not have it, hold it at a healthy class's level ("
                 + ", ".join(f"{FEATURES[j]} {NEUTRAL[j]:g}" for j in flat)
                 + "), as the public data's missing channels are, not at a level the model was not "
                 "trained on")
    # The three rates are shares of the same calls: over 1 together, one is in other units.
    total = X[:, SUCCESS] + X[:, ERROR] + X[:, TIMEOUT]
    over_one = np.flatnonzero(total > 1.01)
    if len(over_one):
        i = int(over_one[0])
        note(f"{path}:{line_of[i]}: success_rate + error_rate + timeout_rate is {total[i]:.4g} "
             f"({X[i, SUCCESS]:g} + {X[i, ERROR]:g} + {X[i, TIMEOUT]:g}), in {len(over_one)} rows: "
             "they are shares of the same calls, at most 1 together; is one a percentage, or of "
             "other calls?")
    X = clip(X)
    step, measured = 0.5, True
    if "time_s" not in header:
        timelike = [h for h in header if h not in FEATURES and _timelike(h)]
        if timelike:
            # Read as 500 ms ticks, an export's minutes would be scored by the tick's rules
            # and the simulator's thresholds.
            raise ValueError(f"{path}:{at}: no time_s column, and a column {timelike[0]!r}: the step "
                             "is read from time_s alone (seconds as a number, e.g. Unix epoch "
                             f"seconds); rename {timelike[0]!r} to time_s, or drop it to read the rows "
                             "as 500 ms ticks")
        note(f"{path}: no time_s column: read as 500 ms steps (the default tick)")
    else:
        t = col["time_s"]
        if len(t) == 1:
            # No step to measure: read_dataset gives it its directory's.
            measured = False
        else:
            d = np.diff(t)
            back = np.flatnonzero(d <= 0)
            if len(back):
                i = int(back[0]) + 1
                if t[i] == t[i - 1] and np.array_equal(X[i], X[i - 1]):
                    same = (" (the row repeats the one before, as exports joined where they "
                            "overlap repeat theirs: drop the repeated rows)")
                elif t[i] == t[i - 1]:
                    same = (" (several series in one file, as a long export has them, go in a file "
                            "each; or time_s was rounded: keep its fractions of a second)")
                elif (d < 0).mean() > 0.5:
                    same = " (the rows are newest first: sort them oldest first)"
                else:
                    same = ""
                raise ValueError(f"{path}:{line_of[i]}: column time_s: {t[i]:.15g} is not after the row "
                                 f"before's {t[i - 1]:.15g} (rows must be in time order, one per step){same}")
            step = float(np.median(d))
            if step > 3600:
                raise ValueError(f"{path}: column time_s moves {step:g} a step (median), over an hour: "
                                 "time_s is in seconds, so if it holds milliseconds divide it by 1000 "
                                 "(steps of over an hour are not read: the predictor watches ticks of "
                                 "a second or so, the harness minutes at most)")
            if step >= 100 and step % 60:
                note(f"{path}: time_s moves {step:g} a step (median): read as {step:g}-second steps; "
                     "time_s is in seconds, so if it holds milliseconds divide it by 1000")
            uneven = np.flatnonzero((d > 1.5 * step) | (d < step / 1.5))
            if len(uneven):
                i = int(uneven[0]) + 1
                note(f"{path}:{line_of[i]}: steps are not even ({len(uneven)} of {len(d)} differ from "
                     f"the median step, {step:g} s, by half or more; this one is {d[i - 1]:g} s): "
                     "each row is taken as one step")
    if "label" in header:
        events = events_from_binary(col["label"])
        share = float(np.mean(col["label"])) if len(col["label"]) else 0.0
        if share > 0.5:
            note(f"{path}: label is 1 on {100 * share:.0f} % of the rows: 1 marks a step of an "
                 "incident in progress, 0 a normal one (is it inverted?); the steps between "
                 "incidents are all the normal time scored")
    else:
        events = breach_events(X)
        named = [h for h in header if h not in COLUMNS and h not in RECORDER_COLUMNS
                 and any(w in h.lower() for w in LABEL_LIKE)]
        if named:
            note(f"{path}: no label column: the incidents are the SLO breaches found in the features "
                 f"(a column named {named[0]!r} is not read: name it label, 1 during an incident)")
    pre_ignore = ignore = None
    if "ignore" in header:
        ign = col["ignore"].astype(bool)
        # An ignored step is no incident's either: an incident all ignored is none, one whose
        # first steps are ignored begins after them (those steps then come before it, below);
        # ignored steps later in an incident neither split nor shorten it.
        kept = []
        for s, e in events:
            begun = np.flatnonzero(~ign[s:e + 1])
            if len(begun):
                kept.append((s + int(begun[0]), e))
        events = kept
        # The ignored run just before each event: its length where it ends, at step s - 1.
        steps = np.arange(len(ign))
        run = steps - np.maximum.accumulate(np.where(ign, -1, steps))
        pre_ignore = [int(run[s - 1]) if s > 0 else 0 for s, _ in events]
        # Anywhere else too: neither a target nor normal time (a false trip there is none).
        ignore = ign if ign.any() else None
    val_from = test_from = 0
    if "split" in header:
        order = col["split"]
        back = np.flatnonzero(np.diff(order) < 0)
        if len(back):
            i = int(back[0]) + 1
            raise ValueError(f"{path}:{line_of[i]}: column split: {SPLITS[order[i]]!r} after "
                             f"{SPLITS[order[i - 1]]!r}: the split must be time-ordered, train then "
                             "val then test (python traces.py split DIR writes one)")
        val_from = int(np.argmax(order != 0)) if (order != 0).any() else len(order)
        test_from = int(np.argmax(order == 2)) if (order == 2).any() else len(order)
    if not X[:, RATE].any():
        # No requests in any step (read_dir skips such a class); but a step with calls
        # finishing says otherwise: the rate was not exported (0 for a missing channel), and
        # skipping the file would lose its incidents.
        # (A step whose three rates are all 0 is one without calls written as 0/0 filled with 0.)
        # Latencies that move are calls' too (a step without calls has none: the recorder
        # writes 0; one held at a level throughout is a missing channel filled), and so are
        # labelled incidents.
        def moving(c):
            return X[:, c] > 0 if np.ptp(X[:, c]) > 0 else np.zeros(len(X), dtype=bool)

        calls = np.flatnonzero(((X[:, SUCCESS] > 0) & (X[:, SUCCESS] < 1)) | (X[:, ERROR] > 0)
                               | (X[:, TIMEOUT] > 0) | moving(P50) | moving(P99))
        labelled = events if "label" in header else []
        if len(calls) or labelled:
            i = int(calls[0]) if len(calls) else labelled[0][0]
            said = [f"{len(calls)} rows have calls finishing (a success rate below 1, errors, timeouts "
                    "or latencies that move)"] if len(calls) else []
            said += [f"{len(labelled)} incidents are labelled"] if labelled else []
            raise ValueError(f"{path}:{line_of[i]}: column rate_ratio is 0 in every row (no requests), "
                             f"yet {' and '.join(said)}, this row first: a class without request "
                             "counts holds rate_ratio at 1, a steady class's level, not 0")
    name = os.path.splitext(os.path.basename(path))[0]
    return Trace(name, dataset, X, events, step, pre_ignore, val_from, test_from,
                 meta={"own": True, "step_measured": measured, "split": "split" in header},
                 ignore=ignore)


def _timelike(name: str) -> bool:
    """A column's name that says it holds the time (timestamp, date, event_time, ts), not a
    duration in its name's middle (uptime)."""
    n = name.strip().lower()
    return (n in ("t", "ts", "epoch", "@timestamp") or n.startswith(("time", "date"))
            or n.endswith(("_time", "_timestamp", "_date", "_ts")))


# Words in a column's name that say it marks incidents (read_csv's note where no `label` is).
LABEL_LIKE = ("label", "anomal", "incident", "outage", "fault", "alert")
# The columns the recorder adds (its model's score, the faults it injected): not labels.
RECORDER_COLUMNS = ("p_anomaly", "fault")


def _csv_files(d: str) -> list:
    """The trace CSVs in `d`, sorted; none is an error (saying which near names were not read)."""
    names = sorted(os.listdir(d))
    # Any case of the extension (a.CSV): the name is the file's own, the case its writer's.
    files = [f for f in names if f.lower().endswith(".csv") and os.path.isfile(os.path.join(d, f))]
    for f in names:
        if f.lower().endswith(".csv") and f not in files:
            note(f"{os.path.join(d, f)}: not a plain file, not read")
    stems = {}
    for f in files:  # a trace is named by its file's name less the extension
        other = stems.setdefault(os.path.splitext(f)[0], f)
        if other != f:
            raise ValueError(f"{d}: {other} and {f} would both be the trace {os.path.splitext(f)[0]!r}: "
                             "rename one")
    if not files:
        near = [f for f in names if ".csv" in f.lower()]
        raise ValueError(f"{d}: no .csv files" + (
            f" ({', '.join(near[:3])}: only plain files named *.csv are read; decompress or "
            "rename them)" if near else ""))
    return files


def read_dir(d: str, dataset: str | None = None) -> list:
    """Every trace CSV in `d`, but those of a class that had no traffic at all (a recorder's
    idle `default` class) or no row yet: there is nothing in them to warn of or to trip on
    (said on stderr, and in NOTES)."""
    out = []
    for f in _csv_files(d):
        try:
            tr = read_csv(os.path.join(d, f), dataset or os.path.basename(os.path.normpath(d)))
        except NoRows as e:
            note(f"{e}, skipped")
            continue
        if not tr.X[:, RATE].any():
            note(f"{os.path.join(d, f)}: no traffic in any step, skipped")
            continue
        out.append(tr)
    if not out:
        raise ValueError(f"{d}: no trace with traffic")
    return out


# The harness's own datasets: a directory of trace CSVs is never reported (or weighted in
# training) under one of these names.
HARNESS_DATASETS = ("simulated", "nab", "nezha", "smd")


def dataset_names(paths: list) -> list:
    """The name each directory of trace CSVs goes by, in reports and in training's weights per
    dataset: its own name, or its whole path where that is taken (by an earlier directory of
    the same name, or by one of the harness's own datasets); a directory given twice is an
    error."""
    taken, seen, out = set(HARNESS_DATASETS), set(), []
    for path in paths:
        full = os.path.normpath(path)
        if os.path.abspath(full) in seen:
            raise ValueError(f"{path}: given twice")
        seen.add(os.path.abspath(full))
        name = os.path.basename(os.path.abspath(full))  # `.` by the directory's own name
        if name in taken:
            name = full if full not in taken else os.path.abspath(full)
        taken.add(name)
        out.append(name)
    return out


# A part's rows in a trace, and what is said of a directory with none (read_dataset's `need`).
_PARTS = {
    "train": (lambda t: t.val_from > 0, "no train rows"),
    "val": (lambda t: t.val_from < t.test_from, "no validation part (no `val` rows)"),
    "test": (lambda t: t.test_from < t.T, "no test data (every row's split is train or val)"),
}


def read_dataset(d: str, name: str, need: tuple = ()) -> list:
    """Every trace CSV in `d` (read_dir) as one dataset named `name`, scored by one set of rules
    (horizons, grace): a directory whose steps fall under both the tick's and the minutes'
    rules is refused. `need` names what it must hold, each refused with why and what to run:
    "split", a split column in every file; "train", "val", "test", rows of that part in at
    least one file."""
    trs = read_dir(d, name)
    # A file of one row has no step of its own: its directory's (500 ms where none has one).
    steps = [t.step_seconds for t in trs if t.meta.get("step_measured", True)]
    for t in trs:
        if not t.meta.get("step_measured", True) and steps:
            t.step_seconds = float(np.median(steps))
    if len({tick_scale(t.step_seconds) for t in trs}) > 1:
        short = next(t for t in trs if tick_scale(t.step_seconds))
        long = next(t for t in trs if not tick_scale(t.step_seconds))
        raise ValueError(f"steps of {short.step_seconds:g} s ({short.name}) and {long.step_seconds:g} s "
                         f"({long.name}) are scored by different rules (horizons, grace): put them "
                         "in separate directories")
    # One threshold is chosen for the whole directory, and horizons are in steps: files whose
    # steps are far apart (a minute and an hour) are warned over different times and pooled.
    lo = min(trs, key=lambda t: t.step_seconds)
    hi = max(trs, key=lambda t: t.step_seconds)
    if hi.step_seconds > 2 * lo.step_seconds:
        note(f"{d}: steps of {lo.step_seconds:g} s ({lo.name}) and {hi.step_seconds:g} s ({hi.name}) "
             "are scored as one dataset (one threshold; horizons in steps, so over different "
             "times): put series of different steps in separate directories")
    # A file without a split beside files with one would be test data from its first row, its
    # reference part (the baselines' thresholds) taken from its test part.
    split = [t for t in trs if t.meta.get("split")]
    if split and len(split) < len(trs):
        bare = next(t for t in trs if not t.meta.get("split"))
        raise ValueError(f"{bare.name} has no split column and {split[0].name} has one: split every "
                         f"file or none (python traces.py split {d} writes a time-ordered one)")
    for part in need:
        if part == "split":
            unsplit = [t.name for t in trs if t.val_from == 0 and t.test_from == 0]
            if unsplit:
                raise ValueError(f"{', '.join(unsplit)}: every row is test data (no split column, "
                                 f"or only `test` rows); python traces.py split {d} adds a "
                                 "time-ordered one")
        elif not any(_PARTS[part][0](t) for t in trs):
            longest = max(trs, key=lambda t: t.T)
            val_from, test_from = split_bounds(longest.T)
            resplit = Trace(longest.name, name, longest.X, [], longest.step_seconds,
                            val_from=val_from, test_from=test_from)
            if not _PARTS[part][0](resplit):
                # `traces.py split` gives each part its share of each file's rows: too few.
                raise ValueError(f"{_PARTS[part][1]}, and its files are too short for `traces.py "
                                 f"split` to give them one (the longest, {longest.name}, has "
                                 f"{longest.T} rows): record longer")
            raise ValueError(f"{_PARTS[part][1]}; python traces.py split {d} writes a time-ordered "
                             "split with train, val and test parts")
    return trs


def read_datasets(paths: list, need: tuple = ()) -> dict:
    """Name (dataset_names) -> traces (read_dataset) of each directory, in order; an error
    naming the directory where one cannot be read or lacks what `need` names."""
    out = {}
    for path, name in zip(paths, dataset_names(paths)):
        if os.path.isfile(path):
            raise ValueError(f"{path}: a file: name the directory that holds it (each directory of "
                             "trace CSVs is a dataset)")
        try:
            out[name] = read_dataset(path, name, need)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
    return out


def split_bounds(n: int, val: float = 0.2, test: float = 0.2) -> tuple:
    """Where `split` starts the validation and test parts of a file of `n` rows: the first
    1 - val - test of it train, at least its first row (a class with one row so far is not
    all test data, which reading the directory would refuse)."""
    val_from = max(1, int(n * (1 - val - test)))
    return val_from, max(val_from, int(n * (1 - test)))


def split(d: str, val: float = 0.2, test: float = 0.2, counts: list | None = None) -> list:
    """Add (or replace) a time-ordered `split` column in every trace CSV in `d`: the first
    1 - val - test of each file train (at least its first row), then val, then test; noted
    where one file's train part and another's test part overlap in time_s. Returns the files written. Every
    file is read (as `read_csv` reads its rows, a chunk at a time) and then copied with its
    split to a file beside it before any is replaced; then each copy is moved over its file
    (its mode kept): a file that cannot be read, or a copy that cannot be written, is an error
    naming it, and then none is changed; so is a file without the feature columns. A file of a
    header alone is left as it is (said on stderr). Rows appended to a file while it is copied
    (a live Recorder) are lost: stop what writes to `d` first. `counts`: a list to append each
    written file's rows in train, val and test to, in the same order."""
    if not (0 < val and 0 < test and val + test < 1):
        raise ValueError(f"--val {val} and --test {test}: each above 0, together below 1")
    read = []
    for f in _csv_files(d):
        path = os.path.join(d, f)
        try:
            read.append((path, check_rows(path)))
        except NoRows as e:
            note(f"{e}: left as it is")
        except ValueError as e:
            raise ValueError(f"{e}; no file was changed") from None
    staged = []
    spans = []  # per file with time_s: (path, first train time, last train time, first test time, last time)
    try:
        for path, n in read:
            val_from, test_from = split_bounds(n, val, test)
            tmp = f"{path}.split-tmp"
            staged.append(tmp)
            with _rows(path) as (header, _, chunks), open(tmp, "w", newline="", encoding="utf-8") as fh:
                keep = [j for j, c in enumerate(header) if c != "split"]
                w = csv.writer(fh, lineterminator="\n")  # as the recorder writes its files
                w.writerow([header[j] for j in keep] + ["split"])
                at = {0, val_from - 1, test_from, n - 1}
                tcol = header.index("time_s") if "time_s" in header else None
                times = {}
                i = 0
                for _, rows in chunks:
                    for r in rows:
                        w.writerow([r[j] for j in keep]
                                   + ["train" if i < val_from else "val" if i < test_from else "test"])
                        if tcol is not None and i in at:
                            times[i] = r[tcol]
                        i += 1
            if len(times) == len(at) and test_from < n:
                try:
                    spans.append((path, *(float(times[k]) for k in (0, val_from - 1, test_from, n - 1))))
                except ValueError:
                    pass  # read_csv names the value when the file is read
            if i != n:  # changed since it was read
                raise ValueError(f"{path}: {n} rows when read, {i} when copied")
            if counts is not None:
                counts.append((val_from, test_from - val_from, n - test_from))
            shutil.copymode(path, tmp)
    except BaseException as e:
        for tmp in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        if isinstance(e, (OSError, ValueError)):
            raise type(e)(f"{e}; no file was changed") from None
        raise
    # Each file is split by its own rows: where the classes cover other periods, one class's
    # training can hold the time of another's test part (an incident both saw, trained on and
    # scored). Said where time_s is a clock the files share (Unix seconds, from 1973); a
    # Recorder's counts each file's ticks from its own first row.
    if not all(sp[1] >= 1e8 for sp in spans):
        spans = []
    for a in spans:
        b = next((b for b in spans if b is not a and a[1] <= b[4] and b[3] <= a[2]), None)
        if b is not None:
            note(f"{a[0]}: its train part (time_s {a[1]:.15g} to {a[2]:.15g}) overlaps the test part "
                 f"of {b[0]} (from {b[3]:.15g}): each file is split by its own rows, so classes "
                 "recorded over other periods share time across parts; give every file the same "
                 "period, or write the split column yourself by time")
            break
    # Each moved over its file (a rename: whole or not at all).
    written = []
    for (path, _), tmp in zip(read, staged):
        os.replace(tmp, path)
        written.append(path)
    _note_untrained_incidents(d)
    return written


def _note_untrained_incidents(d: str) -> None:
    """Note each file with incidents but no positive window in its train part: a recording
    with its faults injected at the end (the usual way to record one) teaches a model nothing
    of them. Each file read alone, quietly (what reading notes, reading it to evaluate or to
    train says again); one that cannot be read is left to them to name."""
    noted = len(NOTES)
    found = []
    try:
        for f in _csv_files(d):
            path = os.path.join(d, f)
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    tr = read_csv(path, os.path.basename(os.path.normpath(d)))
            except (NoRows, OSError, ValueError):
                continue
            if tr.events and not (targets(tr)[:tr.val_from] == 1).any():  # -1: ignored
                found.append((path, tr))
    finally:
        del NOTES[noted:]
    for path, tr in found:
        parts = [sum(1 for s, _ in tr.events if lo <= s < hi)
                 for lo, hi in ((0, tr.val_from), (tr.val_from, tr.test_from), (tr.test_from, tr.T))]
        note(f"{path}: no incident to learn from in its train part ({parts[0]} start there, {parts[1]} "
             f"in validation, {parts[2]} in test): a model trained on it learns nothing of them; "
             "inject faults throughout the recording, or write the split column yourself")


def targets(tr: Trace) -> np.ndarray:
    """The step targets training learns (1 in the headline horizon before an incident, 0 on
    normal steps, -1 where ignored), by the trace's step's rules."""
    H = headline_horizon(tr.step_seconds)
    return early_targets(tr.T, tr.events, H, grace=grace(tr), pre_ignore=tr.pre_ignore, ignore=tr.ignore)


def write_csv(tr: Trace, path: str) -> None:
    lab = np.zeros(tr.T, dtype=int)
    for s, e in tr.events:
        lab[s:e + 1] = 1
    split = np.array(["train"] * tr.T, dtype=object)
    split[tr.val_from:] = "val"
    split[tr.test_from:] = "test"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["time_s", *FEATURES, "label", "split"])
        for t in range(tr.T):
            w.writerow([f"{t * tr.step_seconds:.3f}", *(f"{v:.5g}" for v in tr.X[t]), lab[t], split[t]])


def windows(X: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """[len(idx), 64, 8] windows ending at each index, zero-padded at the start."""
    pad = np.concatenate([np.zeros((WINDOW - 1, N_FEATURES), dtype=np.float32), X])
    from numpy.lib.stride_tricks import sliding_window_view
    v = sliding_window_view(pad, WINDOW, axis=0)  # [T, 8, 64]
    return np.ascontiguousarray(v[idx].transpose(0, 2, 1))


def main():
    ap = argparse.ArgumentParser(description="Add a time-ordered split column to recorded traces.")
    ap.add_argument("command", choices=["split"])
    ap.add_argument("dir", help="a directory of trace CSVs (what Recorder writes; stop it first: "
                    "each file is rewritten, and rows appended meanwhile would be lost)")
    ap.add_argument("--val", type=float, default=0.2, help="share of each file for validation (0.2)")
    ap.add_argument("--test", type=float, default=0.2, help="share of each file for test, the last (0.2)")
    a = ap.parse_args()
    try:
        counts = []
        for path, (train, val, test) in zip(split(a.dir, a.val, a.test, counts), counts):
            print(f"{path}: split {train} train, {val} val, {test} test rows")
    except (OSError, ValueError) as e:
        sys.exit(f"traces.py: {e}")


if __name__ == "__main__":
    main()
