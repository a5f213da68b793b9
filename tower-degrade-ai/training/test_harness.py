"""Tests of the evaluation protocol and the trace format (NumPy only; run with
`python -m unittest discover -s tower-degrade-ai/training`)."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

from protocol import alarms, chance_early, early_targets, episodes, evaluate
from traces import FEATURES, Trace, breach_events, rate_ratio, read_csv, write_csv


class Protocol(unittest.TestCase):
    def test_targets_mark_the_horizon_before_onset_and_ignore_the_incident(self):
        y = early_targets(20, [(10, 12)], H=3, grace=2)
        self.assertEqual(y.tolist(), [0] * 7 + [1, 1, 1] + [-1] * 5 + [0] * 5)

    def test_early_late_missed_and_lead(self):
        a = np.zeros(100, bool)
        a[8] = True          # early for (10, 12), lead 2
        a[31] = True         # late for (30, 35)
        r = evaluate(a, [(10, 12), (30, 35), (60, 62)], H=3, step_seconds=60)
        self.assertEqual((r.early, r.late, r.missed), (1, 1, 1))
        self.assertEqual(r.leads, [2])
        self.assertEqual(r.fp_episodes, 0)
        # which incidents, by place, over series run one after the other
        b = np.zeros(100, bool)
        b[58] = True  # early for (60, 62)
        r.add(evaluate(b, [(10, 12), (60, 62)], H=3, step_seconds=60))
        self.assertEqual(r.summary()["early_events"], [0, 4])

    def test_alarms_on_normal_steps_are_false_trips_merged_within_h(self):
        a = np.zeros(100, bool)
        a[[50, 52, 80]] = True
        r = evaluate(a, [(10, 12)], H=3, step_seconds=60, merge=3)
        self.assertEqual(r.fp_episodes, 2)

    def test_an_alarm_carried_over_from_the_previous_incident_is_not_early(self):
        a = np.zeros(40, bool)
        a[10:25] = True      # raised in incident (10, 12), still on when (22, 24)'s window opens
        r = evaluate(a, [(10, 12), (22, 24)], H=3, step_seconds=60, grace=2)
        self.assertEqual((r.early, r.late), (0, 2))

    def test_k_consecutive_steps(self):
        self.assertEqual(alarms(np.array([1, 1, 0, 1, 1, 1]), 0.5, 3).tolist(),
                         [False, False, False, False, False, True])

    def test_the_chance_level_is_what_an_alarm_blind_to_the_incidents_scores(self):
        # Alarms that start at random (one in 300 quiet steps) and last 1-40 steps, and
        # incidents at random onsets, independent of them: early recall over 4,000 incidents
        # comes out at the chance level computed from the alarm's false trips and time alarmed.
        rng = np.random.default_rng(0)
        T, H = 2_000_000, 6
        a = np.zeros(T, bool)
        t = 0
        while t < T:
            t += int(rng.geometric(1 / 300))
            n = int(rng.integers(1, 41))
            a[t:t + n] = True
            t += n
        onsets = np.sort(rng.choice(np.arange(H + 1, T - 50, 400), 4000, replace=False))
        r = evaluate(a, [(int(s), int(s) + 2) for s in onsets], H=H, step_seconds=60)
        chance = chance_early(r.summary(), H, 60)
        self.assertAlmostEqual(r.early / r.n_events, chance, delta=0.015)
        self.assertGreater(chance, 0.07)  # about 6 % alarmed, plus starts within the window
        # A detector alarmed all the time warns early of everything by chance.
        self.assertEqual(chance_early(dict(normal_time_alarmed=1.0, false_trips_per_day=1.0), H, 60), 1.0)

    def test_ignored_steps_anywhere_are_neither_targets_nor_normal_time(self):
        # Only a run of ignored steps right before an onset was honoured: an alarm on an
        # ignored stretch far from any incident counted as a false trip.
        T = 300
        ign = np.zeros(T, dtype=bool)
        ign[100:150] = True
        a = np.zeros(T, dtype=bool)
        a[110:120] = True
        events = [(250, 260)]
        plain = evaluate(a, events, 6, 60.0)
        self.assertEqual(plain.fp_episodes, 1)
        r = evaluate(a, events, 6, 60.0, ignore=ign)
        self.assertEqual(r.fp_episodes, 0)
        self.assertEqual(r.normal_steps, plain.normal_steps - 50)
        y = early_targets(T, events, 6, ignore=ign)
        self.assertTrue((y[100:150] == -1).all())
        self.assertTrue((y[244:250] == 1).all(), "the targets are kept")

    def test_episodes_merge(self):
        self.assertEqual(episodes(np.array([1, 0, 0, 1, 0, 0, 0, 0, 1]), merge=2), [(0, 3), (8, 8)])


class Traces(unittest.TestCase):
    def test_rate_ratio_is_rate_over_the_mean_of_the_previous_64(self):
        r = rate_ratio(np.array([100.0] * 64 + [200.0]))
        self.assertAlmostEqual(r[0], 1.0)
        self.assertAlmostEqual(r[-1], 2.0)

    def test_a_missing_rate_is_missing_in_its_own_row_only(self):
        # A failed scrape: the rows after it are over the mean of the rates their window has.
        rps = np.full(500, 50.0)
        rps[100] = np.nan
        rps[101] = 100.0
        r = rate_ratio(rps)
        self.assertEqual(list(np.flatnonzero(np.isnan(r))), [100])
        self.assertAlmostEqual(r[101], 2.0)
        self.assertAlmostEqual(r[400], 1.0)

    def test_a_negative_or_infinite_rate_is_refused_naming_its_row(self):
        for bad in (-5.0, np.inf):
            rps = np.full(10, 50.0)
            rps[7] = bad
            with self.assertRaisesRegex(ValueError, r"rate in row 7 .*counter reset"):
                rate_ratio(rps)

    def test_a_flapping_breach_is_one_incident_and_blips_are_none(self):
        X = np.tile(np.array([1, 1, 0, 0, 0.1, 0.5, 0.2, 0.0], np.float32), (200, 1))
        X[50:53, 5] = 2.0    # 3 ticks over the SLA
        X[60:70, 1] = 0.5    # half the calls fail, 5 ticks later: same incident
        X[150:152, 5] = 2.0  # 2 ticks: a blip
        self.assertEqual(breach_events(X), [(50, 69)])

    def test_csv_round_trip_keeps_events_and_splits(self):
        X = np.random.default_rng(0).random((100, 8)).astype(np.float32)
        tr = Trace("t", "recorded", X, [(40, 45)], 0.5, None, 60, 80)
        with tempfile.TemporaryDirectory() as d:
            write_csv(tr, os.path.join(d, "t.csv"))
            back = read_csv(os.path.join(d, "t.csv"))
        self.assertEqual(back.events, [(40, 45)])
        self.assertEqual((back.val_from, back.test_from, back.step_seconds), (60, 80, 0.5))
        np.testing.assert_allclose(back.X, X, rtol=1e-4)

    def test_split_adds_a_time_ordered_split_and_idle_classes_are_skipped(self):
        import contextlib
        import io
        from pathlib import Path
        from traces import read_dir, split
        X = np.random.default_rng(0).random((100, 8)).astype(np.float32) * 0.9 + 0.1  # rates <= 1
        idle = X.copy()
        idle[:, 0] = 0.0  # rate_ratio: no traffic in any step
        # and so no call finishing: success 1, no error, no timeout, no latency (as the
        # recorder writes a tick without calls)
        idle[:, 1:6] = [1.0, 0.0, 0.0, 0.0, 0.0]
        with tempfile.TemporaryDirectory() as d:
            write_csv(Trace("busy", "x", X, [(40, 45)], 0.5), os.path.join(d, "busy.csv"))
            write_csv(Trace("idle", "x", idle, [], 0.5), os.path.join(d, "idle.csv"))
            counts = []
            written = split(d, counts=counts)
            self.assertEqual(len(written), 2)
            self.assertEqual(counts, [(60, 20, 20), (60, 20, 20)])  # train, val, test rows
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                (tr,) = read_dir(d)
            self.assertIn("idle.csv: no traffic in any step, skipped", err.getvalue())
            self.assertEqual((tr.name, tr.val_from, tr.test_from), ("busy", 60, 80))
            self.assertEqual(tr.events, [(40, 45)], "the other columns kept")
            with self.assertRaisesRegex(ValueError, "each above 0, together below 1"):
                split(d, 0.5, 0.5)
            # a file of a header alone (a class that has not run a tick) is left as it is and
            # skipped when read, with a note, the others split
            header_only = "time_s," + ",".join(FEATURES) + "\n"
            with open(os.path.join(d, "a-empty.csv"), "w") as f:
                f.write(header_only)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                self.assertEqual([os.path.basename(p) for p in split(d, 0.1, 0.1)], ["busy.csv", "idle.csv"])
                self.assertEqual([t.name for t in read_dir(d)], ["busy"])
            self.assertIn("a-empty.csv: a header and no rows: left as it is", err.getvalue())
            self.assertIn("a-empty.csv: a header and no rows, skipped", err.getvalue())
            self.assertEqual(Path(os.path.join(d, "a-empty.csv")).read_text(), header_only)
            # nor a file that is not a trace (no feature columns), and no file is changed
            before = Path(os.path.join(d, "busy.csv")).read_text()
            self.assertNotIn("\r", before, "written with the recorder's line breaks")
            with open(os.path.join(d, "b-export.csv"), "w") as f:
                f.write("Time,checkout rps,checkout success %\n2024-11-04T00:00:00Z,12,99.9\n")
            with self.assertRaisesRegex(ValueError, r"b-export.csv:1: missing column\(s\) rate_ratio, "
                                        r".*; no file was changed"):
                split(d)
            self.assertEqual(Path(os.path.join(d, "busy.csv")).read_text(), before)
            os.remove(os.path.join(d, "b-export.csv"))
            # Nor one with a row longer than its header, after a good file (the good one was
            # rewritten and the long one cut short at its bad row).
            os.remove(os.path.join(d, "a-empty.csv"))
            lines = Path(os.path.join(d, "busy.csv")).read_text().splitlines()
            lines[7] += ",1"
            with open(os.path.join(d, "zz-long.csv"), "w") as f:
                f.write("\n".join(lines) + "\n")
            long_before = Path(os.path.join(d, "zz-long.csv")).read_text()
            with self.assertRaisesRegex(ValueError, r"zz-long.csv:8: 12 fields, the header has 11; no file was changed"):
                split(d, 0.1, 0.1)
            self.assertEqual(Path(os.path.join(d, "busy.csv")).read_text(), before)
            self.assertEqual(Path(os.path.join(d, "zz-long.csv")).read_text(), long_before)
            self.assertEqual(sorted(os.listdir(d)), ["busy.csv", "idle.csv", "zz-long.csv"])

    def test_split_notes_a_file_whose_incidents_are_all_past_its_train_part(self):
        import contextlib
        import io
        import traces
        from traces import split
        X = np.random.default_rng(2).random((200, 8)).astype(np.float32) * 0.9 + 0.1
        with tempfile.TemporaryDirectory() as d:
            # A recording with its fault injected at the end, as one records one, and another
            # with one early: only the first is noted.
            write_csv(Trace("late", "x", X, [(150, 160)], 0.5), os.path.join(d, "late.csv"))
            write_csv(Trace("early", "x", X, [(30, 40), (170, 180)], 0.5), os.path.join(d, "early.csv"))
            traces.NOTES.clear()
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                split(d)
            late = os.path.join(d, "late.csv")
            self.assertEqual(traces.NOTES, [
                f"{late}: no incident to learn from in its train part (0 start there, 1 in "
                "validation, 0 in test): a model trained on it learns nothing of them; inject "
                "faults throughout the recording, or write the split column yourself"])
            self.assertIn(f"{late}: no incident to learn from", err.getvalue())

    def test_split_keeps_a_short_file_trainable_and_notes_classes_of_other_periods(self):
        import contextlib
        import io
        import traces
        from traces import read_datasets, split
        X = np.random.default_rng(1).random((100, 8)).astype(np.float32) * 0.9 + 0.1
        with tempfile.TemporaryDirectory() as d:
            write_csv(Trace("svc", "x", X, [(40, 45)], 60.0), os.path.join(d, "svc.csv"))
            # A class seen once so far: all test data would be refused by what reads the directory.
            write_csv(Trace("new", "x", X[:1], [], 60.0), os.path.join(d, "new.csv"))
            counts = []
            traces.NOTES.clear()
            with contextlib.redirect_stderr(io.StringIO()):
                split(d, counts=counts)
            self.assertEqual(counts, [(1, 0, 0), (60, 20, 20)])
            self.assertEqual(traces.NOTES, [], "one period: nothing to note")
            trs = read_datasets([d], need=("split",))[os.path.basename(d)]
            self.assertEqual([(t.name, t.val_from, t.test_from) for t in trs], [("new", 1, 1), ("svc", 60, 80)])
        with tempfile.TemporaryDirectory() as d:
            # Two classes of other periods: the late one's train part is in the early one's test part.
            write_csv(Trace("early", "x", X, [], 60.0), os.path.join(d, "early.csv"))
            late = os.path.join(d, "late.csv")
            write_csv(Trace("late", "x", X[:50], [], 60.0), late)
            with open(late) as f:
                lines = f.read().splitlines()
            early = os.path.join(d, "early.csv")
            with open(early) as f:
                first = f.read().splitlines()

            def clock(rows, start):  # time_s in Unix seconds from `start`
                return "\n".join([rows[0]] + [f"{float(r.split(',', 1)[0]) + start:.3f},{r.split(',', 1)[1]}"
                                              for r in rows[1:]]) + "\n"
            with open(early, "w") as f:
                f.write(clock(first, 1.7e9))
            with open(late, "w") as f:  # the same step, 70 minutes later
                f.write(clock(lines, 1.7e9 + 4200))
            traces.NOTES.clear()
            with contextlib.redirect_stderr(io.StringIO()):
                split(d)
            self.assertEqual(len(traces.NOTES), 1, traces.NOTES)
            self.assertRegex(traces.NOTES[0], r"late.csv: its train part \(time_s 1700004200 to 1700005940\) "
                                              r"overlaps the test part of .*early.csv \(from 1700004800\): each "
                                              r"file is split by its own rows")
        with tempfile.TemporaryDirectory() as d:
            # A Recorder's time_s counts each file's ticks from its first row: no clock to compare.
            write_csv(Trace("early", "x", X, [], 60.0), os.path.join(d, "early.csv"))
            write_csv(Trace("late", "x", X[:50], [], 60.0), os.path.join(d, "late.csv"))
            traces.NOTES.clear()
            with contextlib.redirect_stderr(io.StringIO()):
                split(d)
            self.assertEqual(traces.NOTES, [])

    def test_a_report_to_a_directory_that_does_not_exist_is_refused_before_the_run(self):
        from traces import missing_out_dir
        with tempfile.TemporaryDirectory() as d:
            there, nowhere = os.path.join(d, "r.md"), os.path.join(d, "no", "r.json")
            self.assertIsNone(missing_out_dir(out=there, json=None))
            self.assertEqual(missing_out_dir(out=there, json=nowhere),
                             f"--json {nowhere}: the directory {os.path.join(d, 'no')} does not exist")
            self.assertIn("--from-json", missing_out_dir(from_json=nowhere))
            # A directory where the file is to go: refused before the work, not after it.
            self.assertEqual(missing_out_dir(out=d), f"--out {d}: a directory; name a file in it")
            run = subprocess.run([sys.executable, "evaluate.py", "--model", "nonexistent.onnx",
                                  "--traces-only", "--traces", d, "--out", nowhere],
                                 capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
            self.assertNotEqual(run.returncode, 0)
            self.assertIn(f"--out {nowhere}: the directory", run.stderr)

    def test_the_grace_of_a_trace_goes_by_its_step_not_its_directory_name(self):
        from traces import GRACE, grace
        X = np.zeros((10, 8), np.float32)
        X[:, 0] = 1.0  # traffic: every step's calls failed
        self.assertEqual(grace(Trace("a", "mine", X, [], 0.5)), GRACE["recorded"])
        self.assertEqual(grace(Trace("a", "mine", X, [], 60.0)), 3)
        self.assertEqual(grace(Trace("a", "nab", X, [], 300.0)), GRACE["nab"])
        # Your own 500 ms traces in a directory named `nab` are not scored by NAB's rules.
        with tempfile.TemporaryDirectory() as d:
            os.mkdir(os.path.join(d, "nab"))
            write_csv(Trace("svc", "x", X, [], 0.5), os.path.join(d, "nab", "svc.csv"))
            tr = read_csv(os.path.join(d, "nab", "svc.csv"), "nab")
            self.assertEqual(grace(tr), GRACE["recorded"])

    def test_bad_input_names_the_file_line_and_column(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "bad.csv")
            with open(p, "w") as f:
                f.write(",".join(FEATURES) + "\n" + ",".join(["1"] * 7 + ["x"]) + "\n")
            with self.assertRaisesRegex(ValueError, r"bad.csv:2: column queue_delay_over_sla"):
                read_csv(p)
            with open(p, "w") as f:
                f.write("time_s,rate_ratio\n0,1\n")
            with self.assertRaisesRegex(ValueError, r"bad.csv:1: missing column\(s\) success_rate"):
                read_csv(p)
            # A name with units after it, and an export of other columns altogether.
            with open(p, "w") as f:
                f.write("time_s," + ",".join(FEATURES).replace("p99_over_sla", "p99_over_sla (ratio)") + "\n0"
                        + ",1" * len(FEATURES) + "\n")
            with self.assertRaisesRegex(ValueError, r"bad.csv:1: missing column\(s\) p99_over_sla \(found "
                                                    r"'p99_over_sla \(ratio\)' for p99_over_sla: name the column "
                                                    r"exactly\)$"):
                read_csv(p)
            with open(p, "w") as f:
                f.write("timestamp,latency_ms,errors\n0,1,2\n")
            with self.assertRaisesRegex(ValueError, r"missing column\(s\) rate_ratio, .*computed into these"):
                read_csv(p)

    def write(self, d, lines, header=None):
        p = os.path.join(d, "t.csv")
        with open(p, "w", encoding="utf-8") as f:
            f.write((header or "time_s," + ",".join(FEATURES) + ",label,split") + "\n")
            f.write("\n".join(lines) + "\n")
        return p

    def row(self, t, p99="0.2", label="0", split="train", success="1"):
        return f"{t},1,{success},0,0,0.1,{p99},1,0,{label},{split}"

    def test_values_the_features_cannot_hold_are_refused_with_the_line(self):
        with tempfile.TemporaryDirectory() as d:
            for bad, what in (("nan", "not a finite number"), ("inf", "not a finite number"),
                              ("-5", "negative"), ("1e999", "not a finite number"),
                              # what Python's float() reads as another number (25, 3)
                              ("2_5", "not a number: '2_5'"), ("\u0663", "not a number")):
                p = self.write(d, [self.row(0), self.row(1, p99=bad), self.row(2)])
                with self.assertRaisesRegex(ValueError, rf"t.csv:3: column p99_over_sla: {what}"):
                    read_csv(p)
            # the time too (float("79_0") is 790)
            p = self.write(d, [self.row(0), self.row("1_0"), self.row(2)])
            with self.assertRaisesRegex(ValueError, r"t.csv:3: column time_s: not a number: '1_0'"):
                read_csv(p)
            # Two exports joined into one file: the second's header is said to be one (a trial
            # read "column time_s: not a number: 'time_s'").
            header = "time_s," + ",".join(FEATURES) + ",label,split"
            p = self.write(d, [self.row(0), self.row(1), header, self.row(2)])
            with self.assertRaisesRegex(ValueError, r"t.csv:4: the header again \(files joined into one, "
                                                    r"each with its header\? keep the first header only\)$"):
                read_csv(p)
            # above the Rust clip range: clipped as the runtime does, and the breach still found
            p = self.write(d, [self.row(t, p99="1e300" if 5 <= t < 9 else "0.2").rsplit(",", 2)[0]
                               for t in range(20)],
                          header="time_s," + ",".join(FEATURES))
            tr = read_csv(p)
            self.assertEqual(float(tr.X[6, 5]), 20.0)
            self.assertEqual(tr.events, [(5, 8)])

    def test_what_a_monitoring_export_gets_wrong_is_named_with_what_to_do(self):
        import contextlib
        import io
        import traces
        with tempfile.TemporaryDirectory() as d:
            # Every value that cannot be read: the first by line (whatever its column), and how many.
            rows = [self.row(t) for t in range(10)]
            rows[7] = self.row(7, success="")
            rows[4] = self.row(4, p99="NaN")
            rows[8] = self.row(8, success="")
            with self.assertRaisesRegex(ValueError, r"t.csv:6: column p99_over_sla: not a finite number: "
                                                    r"'NaN' \(3 values cannot be read in all, in lines 6-10: "
                                                    r"fill them in or drop their rows\)$"):
                read_csv(self.write(d, rows))
            # Percentages, refused on every row: divided, not dropped.
            with self.assertRaisesRegex(ValueError, r"t.csv:2: column success_rate: above 1: .*not a percentage\) "
                                                    r"\(10 values cannot be read in all, in lines 2-11: "
                                                    r"divide the column by 100\)$"):
                read_csv(self.write(d, [self.row(t, success="97.5") for t in range(10)]))
            # Words on some rows only: those are filled in or dropped.
            rows = [self.row(t, label="false" if t < 3 else "0") for t in range(10)]
            with self.assertRaisesRegex(ValueError, r"fill them in or drop their rows\)$"):
                read_csv(self.write(d, rows))
            # A label of words on every row: the column is converted, not its rows dropped.
            rows = [self.row(t, label="false") for t in range(10)]
            with self.assertRaisesRegex(ValueError, r"t.csv:2: column label: .*\(10 values cannot be read in "
                                                    r"all, in lines 2-11: every row's: the column is in "
                                                    r"another format, convert it\)$"):
                read_csv(self.write(d, rows))
            with self.assertRaisesRegex(ValueError, r"t.csv:2: column time_s: not a number: '2024-11-04T00:00:00Z' "
                                                    r"\(time_s is seconds as a number, e.g. Unix epoch seconds"):
                read_csv(self.write(d, ["2024-11-04T00:00:00Z" + self.row(0)[1:]]))
            with self.assertRaisesRegex(ValueError, r"t.csv:3: column time_s: 1730679000 is not after the "
                                                    r"row before's 1730679060"):
                read_csv(self.write(d, [self.row(1730679060), self.row(1730679000)]))
            # Names in other case, a tab-separated file, a row a crash cut short.
            with self.assertRaisesRegex(ValueError, r"t.csv:1: missing column\(s\) rate_ratio, .* \(names "
                                                    r"are lower case: found Rate_Ratio, Success_Rate"):
                read_csv(self.write(d, [self.row(0)], header="time_s," + ",".join(
                    f.title() if i < 2 else f for i, f in enumerate(FEATURES)) + ",label,split"))
            with self.assertRaisesRegex(ValueError, r"t.csv:1: the header has tabs in it: the columns must "
                                                    r"be separated by commas$"):
                read_csv(self.write(d, [self.row(0).replace(",", "\t")],
                                    header="\t".join(["time_s", *FEATURES])))
            # (split once before it was refused: its `,split` made the header two fields)
            with self.assertRaisesRegex(ValueError, r"t.csv:1: the header has tabs in it: the columns must "
                                                    r"be separated by commas$"):
                read_csv(self.write(d, [self.row(0).replace(",", "\t") + ",train"],
                                    header="\t".join(["time_s", *FEATURES]) + ",split"))
            with self.assertRaisesRegex(ValueError, r"t.csv:3: 4 fields, the header has 11 \(a row cut short"):
                read_csv(self.write(d, [self.row(0), "60,1,1,0"]))
            # A time column under another name: read as 500 ms ticks, an export's minutes were
            # scored by the tick's rules (noted only, until 4 December).
            with self.assertRaisesRegex(ValueError, r"t.csv:1: no time_s column, and a column 'timestamp': "
                                                    r"the step is read from time_s alone .* rename 'timestamp' "
                                                    r"to time_s, or drop it to read the rows as 500 ms ticks"):
                read_csv(self.write(d, [self.row(0)[2:] + f",{t}" for t in (0, 60)],
                                    header=",".join(FEATURES) + ",label,split,timestamp"))
            # A duration's name is not a time column (the file is read as 500 ms ticks, noted).
            self.assertEqual([traces._timelike(h) for h in ("Date", "event_time", "ts", "uptime", "fault")],
                             [True, True, True, False, False])
            # A long export: several series in one file.
            with self.assertRaisesRegex(ValueError, r"t.csv:3: column time_s: 60 is not after the row "
                                                    r"before's 60 .*several series in one file"):
                read_csv(self.write(d, [self.row(60), self.row(60, p99="0.3")]))
            # ... or a time rounded to whole seconds on 500 ms ticks; rows newest first.
            with self.assertRaisesRegex(ValueError, r"or time_s was rounded: keep its fractions"):
                read_csv(self.write(d, [self.row(60), self.row(60, p99="0.3")]))
            # Exports joined where they overlap: a row repeated.
            with self.assertRaisesRegex(ValueError, r"t.csv:4: column time_s: 120 is not after .*the row "
                                                    r"repeats the one before.*drop the repeated rows\)$"):
                read_csv(self.write(d, [self.row(60), self.row(120), self.row(120)]))
            with self.assertRaisesRegex(ValueError, r"t.csv:3: column time_s: 60 is not after the row "
                                                    r"before's 120 \(.*\) \(the rows are newest first: sort"):
                read_csv(self.write(d, [self.row(120), self.row(60), self.row(0)]))
            # A rate not exported, filled with 0, where calls finish: refused, not skipped as an
            # idle class (its incidents would be lost).
            zero_rate = [self.row(t, success="0.99").replace(",1,0.99,", ",0,0.99,", 1) for t in (0, 60)]
            with self.assertRaisesRegex(ValueError, r"t.csv:2: column rate_ratio is 0 in every row \(no "
                                                    r"requests\), yet 2 rows have calls finishing .*, this row "
                                                    r"first: .* holds rate_ratio at 1"):
                read_csv(self.write(d, zero_rate))
            # Every call served (success 1, no errors): latencies that move say there were
            # calls, and a labelled incident too (a trial's file was skipped, its incidents lost).
            served = [self.row(t, p99=p99).replace(",1,1,", ",0,1,", 1) for t, p99 in ((0, "0.2"), (60, "0.3"))]
            with self.assertRaisesRegex(ValueError, r"t.csv:2: column rate_ratio is 0 in every row .* yet 2 rows"):
                read_csv(self.write(d, served))
            labelled = [f"{t},0,0,0,0,0,0,0,0,{int(t > 0)},train" for t in (0, 60)]
            with self.assertRaisesRegex(ValueError, r"t.csv:3: column rate_ratio is 0 in every row .* yet 1 "
                                                    r"incidents are labelled, this row first"):
                read_csv(self.write(d, labelled))
            # An idle class whose missing latencies are held at a healthy level, as the docs
            # say to fill them: read (read_dir skips it as idle), not refused.
            idle = read_csv(self.write(d, [f"{t},0,1,0,0,0.15,0.5,0,0,0,train" for t in (0, 60)]))
            self.assertFalse(idle.X[:, 0].any())
            # Rates of 0/0 filled with 0 (no calls) and no rate: an idle class, skipped as one.
            read_csv(self.write(d, [f"{t},0,0,0,0,0,0,0,0,0,train" for t in (0, 60)]))
            # Noted, and kept for the report: no time column at all, rates of other calls, a
            # label column under another name.
            traces.NOTES.clear()
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                read_csv(self.write(d, [self.row(0)[2:] for _ in (0, 60)],
                                    header=",".join(FEATURES) + ",label,split"))
                read_csv(self.write(d, [self.row(t, success="0.999").replace(",0,0,0.1", ",0.097,0,0.1", 1)
                                        for t in (0, 60)]))
                read_csv(self.write(d, [self.row(t).rsplit(",", 2)[0] + ",0" for t in (0, 60)],
                                    header="time_s," + ",".join(FEATURES) + ",is_anomaly"))
                # the recorder's own columns are not labels
                read_csv(self.write(d, [self.row(t).rsplit(",", 2)[0] + ",0.1,0" for t in (0, 60)],
                                    header="time_s," + ",".join(FEATURES) + ",p_anomaly,fault"))
                read_csv(self.write(d, [self.row(t).rsplit(",", 2)[0] + ",0" for t in (0, 60)],
                                    header="time_s," + ",".join(FEATURES) + ",Outage"))
            self.assertEqual(len(traces.NOTES), 4, traces.NOTES)
            self.assertIn("a column named 'Outage' is not read: name it label", traces.NOTES[3])
            self.assertIn("t.csv: no time_s column: read as 500 ms steps (the default tick)", traces.NOTES[0])
            self.assertIn("t.csv:2: success_rate + error_rate + timeout_rate is 1.096 (0.999 + 0.097 + 0), "
                          "in 2 rows", traces.NOTES[1])
            self.assertIn("t.csv: no label column: the incidents are the SLO breaches found in the "
                          "features (a column named 'is_anomaly' is not read: name it label", traces.NOTES[2])
            self.assertEqual(err.getvalue(), "".join(n + "\n" for n in traces.NOTES))
            traces.NOTES.clear()
            # A channel at one value in every row of a window's length or more, other than a
            # healthy class's level: a channel the export did not have, filled with 0.
            with contextlib.redirect_stderr(io.StringIO()):
                read_csv(self.write(d, [self.row(t * 60) for t in range(64)]))
            self.assertEqual(len(traces.NOTES), 1, traces.NOTES)
            self.assertIn("t.csv: column p50_over_sla is 0.1, column p99_over_sla is 0.2, column "
                          "inflight_over_little is 1 in every row: if the export did not have it, hold it "
                          "at a healthy class's level (p50_over_sla 0.15, p99_over_sla 0.5, "
                          "inflight_over_little 0.2)", traces.NOTES[0])
            traces.NOTES.clear()
            # At those levels (read as float64 against float32 ones), or a queue at 0 (a class
            # that never waits, as the runtime writes it): nothing to say.
            with contextlib.redirect_stderr(io.StringIO()):
                read_csv(self.write(d, [f"{t * 60},1,1,0,0,0.15,0.5,0.2,0,0,train" for t in range(64)]))
            self.assertEqual(traces.NOTES, [])
            with contextlib.redirect_stderr(io.StringIO()):
                read_csv(self.write(d, [self.row(t * 60) for t in range(63)]))  # too short to judge
            self.assertEqual(traces.NOTES, [])
            # A directory named like a trace is not read as one.
            os.remove(os.path.join(d, "t.csv"))
            os.mkdir(os.path.join(d, "archive.csv"))
            read_csv(self.write(d, [self.row(t) for t in (0, 60)]))
            with contextlib.redirect_stderr(io.StringIO()):
                self.assertEqual([t.name for t in traces.read_dir(d)], ["t"])
            self.assertIn("archive.csv: not a plain file, not read", traces.NOTES[-1])
            traces.NOTES.clear()

    def test_the_report_carries_the_notes_and_cautions_on_too_little_data(self):
        import evaluate
        from traces import notes_section
        self.assertEqual(notes_section([]), "")
        self.assertIn("- a.csv: no time_s column", notes_section(["a.csv: no time_s column"]))
        row = dict(dataset="svc", H=6, k=1, budget_per_day=1.0, detector="model", step_seconds=60.0,
                   events=2, early=0, late=1, false_trips=1,
                   test_days=0.25, recall_early=0.0, recall_early_ci=(0.0, 0.0), recall_any=0.5,
                   precision=0.5, false_trips_per_day=4.0, normal_time_alarmed=0.01,
                   median_lead_steps=float("nan"), auprc=0.1, base_rate=0.01)
        text = evaluate.table([row], "svc", 6, 1, 1.0, caution=True)
        self.assertIn("*Caution: 2 test incident(s): an early recall over so few moves in steps of 0.50", text)
        self.assertIn("*Caution: 0.25 days of normal test data: one false trip there reads as 4 a day", text)
        self.assertNotIn("Caution", evaluate.table([row], "svc", 6, 1, 1.0))
        row.update(events=30, test_days=3.0)
        self.assertNotIn("Caution", evaluate.table([row], "svc", 6, 1, 1.0, caution=True))
        # Nothing to measure reads as a dash, not as a 0 (nor as a billion false trips a day).
        row.update(events=0, test_days=0.0, false_trips_per_day=1e9)
        text = evaluate.table([row], "svc", 6, 1, 1.0, caution=True)
        self.assertIn("*Caution: no test incident: no early recall to measure, only false trips.*", text)
        self.assertIn("*Caution: no normal test data (every test step is in an incident", text)
        self.assertIn("| model | – | – | 0.50 | – | 1.00 % |", text)
        self.assertNotIn("e+09", text)
        # The default that armed on no series with test data: nothing to show.
        row.update(events=3, test_days=2.0, false_trips_per_day=0.0)
        default = dict(row, detector=evaluate.AS_DEFAULT, series=2, unarmed=2)
        text = evaluate.table([row, default], "svc", 6, 1, 1.0)
        self.assertIn(f"| {evaluate.AS_DEFAULT} | never armed | – | – | – | – |", text)
        default.update(unarmed=1)
        self.assertIn(f"| {evaluate.AS_DEFAULT} | 0.00 [0.00, 0.00] | 0.50 | 0.50 | 0.00 | 1.00 % |",
                      evaluate.table([row, default], "svc", 6, 1, 1.0))
        # no alarm raised: no precision to measure
        default.update(late=0, false_trips=0, precision=0.0)
        self.assertIn(f"| {evaluate.AS_DEFAULT} | 0.00 [0.00, 0.00] | 0.50 | – | 0.00 | 1.00 % |",
                      evaluate.table([row, default], "svc", 6, 1, 1.0))

    def test_the_report_breaks_a_directory_down_per_file(self):
        import evaluate
        rng = np.random.default_rng(3)
        traces, onsets = [], {"a": [700, 850], "b": [], "c": [900]}
        for name, starts in onsets.items():
            X = np.tile(np.array([1, 1, 0, 0, 0.1, 0.3, 0.2, 0.03], np.float32), (1000, 1))
            X[:, 5] += rng.normal(0, 0.01, 1000).astype(np.float32)
            for s0 in starts:
                X[s0 - 4:s0, 5] = 0.6   # a precursor the rule below sees
                X[s0:s0 + 5, 5] = 2.0   # the breach
            traces.append(Trace(name, "svc", X, breach_events(X), 60.0, None, 400, 600))
        # As evaluate_dataset makes the directory's headline row (without its AUPRC: no scikit-learn here).
        scores = {"static robust z": [tr.X[:, 5].astype(float) for tr in traces]}
        thr = evaluate.choose_threshold(traces, scores["static robust z"], 6, 1.0)
        whole = evaluate.run_part(traces, scores["static robust z"], "test", thr, 6, 1)
        head = [dict(detector="static robust z", H=6, k=1, budget_per_day=1.0, threshold=thr,
                     **whole.summary())]
        files = evaluate.per_file_rows(head, traces, scores)
        self.assertEqual([(f["file"], f["events"], f["early"]) for f in files], [("a", 2, 2), ("b", 0, 0), ("c", 1, 1)])
        self.assertEqual(sum(f["early"] for f in files), head[0]["early"])
        self.assertEqual(sum(f["false_trips"] for f in files), head[0]["false_trips"])
        text = evaluate.file_table(head, files)
        self.assertIn("| file | test incidents | days of normal test data | static robust z |", text)
        self.assertIn("| a | 2 | ", text)
        self.assertRegex(text, r"\| a \| 2 \| 0\.\d\d \| 2 of 2; \d+ \|\n\| b \| 0 \| ")
        self.assertEqual(evaluate.file_table(head, files[:1]), "", "one file: nothing to break down")
        # The default that never armed on a file says so; a `|` in a file's name is escaped.
        files = [dict(f, file="a|b") if f["file"] == "a" else f for f in files]
        files += [dict(f, detector=evaluate.AS_DEFAULT, armed=f["file"] != "c") for f in files]
        text = evaluate.file_table(head, files)
        self.assertIn("| a\\|b | 2 | ", text)
        self.assertRegex(text, r"\| c \| 1 \| 0\.\d\d \| not armed \| 1 of 1; \d+ \|")

    def test_the_simulator_sets_the_thresholds_of_unsplit_traces_at_its_own_step_only(self):
        import evaluate
        X = np.zeros((10, 8), np.float32)
        for step, refused in ((0.5, False), (1.0, False), (0.25, False), (10.0, True), (300.0, True)):
            trs = [Trace("t", "x", X, [], step)]
            why = evaluate.unsplit_refusal("DIR", trs)
            self.assertEqual(why is not None, refused, step)
            if refused:
                self.assertIn(f"DIR: no validation part (no `val` rows), and its steps ({step:g} s) are "
                              "not the simulator's 0.5 s tick", why)
                self.assertTrue(why.endswith("python traces.py split DIR writes a time-ordered split"))
        # with a validation part of its own, any step
        self.assertIsNone(evaluate.unsplit_refusal("DIR", [Trace("t", "x", X, [], 300.0, None, 4, 8)]))
        # each file's step counts, not the directory's median
        trs = [Trace("a", "x", X, [], 0.5), Trace("b", "x", X, [], 0.5), Trace("c", "x", X, [], 10.0)]
        self.assertIn("DIR: no validation part (no `val` rows), and c's steps (10 s) are not the "
                      "simulator's 0.5 s tick", evaluate.unsplit_refusal("DIR", trs))

    def test_a_traces_path_that_is_a_file_is_named(self):
        from traces import read_datasets
        with tempfile.NamedTemporaryFile(suffix=".csv") as f:
            with self.assertRaisesRegex(ValueError, r"\.csv: a file: name the directory that holds it"):
                read_datasets([f.name])

    def test_the_report_says_on_which_series_the_default_never_armed(self):
        import evaluate
        X = np.zeros((10, 8), np.float32)
        trs = [Trace("a", "x", X, [], 60.0, None, 4, 8), Trace("b", "x", X, [], 60.0, None, 4, 8),
               Trace("train-only", "x", X, [], 60.0, None, 8, 10)]
        self.assertIsNone(evaluate.unarmed_note("svc", trs, [3, 5, None]))
        said = evaluate.unarmed_note("svc", trs, [3, None, None])
        self.assertTrue(said.startswith("evaluate.py: svc: the breaker's default never armed on 1 of 2 "
                                        "series with test data (b): its first fit needs at least 2,500 healthy "
                                        "steps after a series' first 67, each learnt 40 steps later"), said)
        # Armed, but after its test part began: the incidents before are no warning.
        # (At minute steps the protocol counts the test incidents from 6 steps into the part:
        # that at 5 is none; that at 14 starts where the threshold first held, too late.)
        Y = np.zeros((30, 8), np.float32)
        late = [Trace("a", "x", Y, [(5, 6), (14, 15), (20, 21)], 60.0, None, 2, 4)]
        self.assertIsNone(evaluate.late_armed_note("svc", late, [4]))
        said = evaluate.late_armed_note("svc", late, [14])
        self.assertTrue(said.startswith("evaluate.py: svc: the breaker's default first held after the "
                                        "test part began on 1 of 1 series with test data (a: from step 14, "
                                        "its test part from 4): 1 test incident(s) came before it held"), said)

    def test_the_calibrated_rule_scores_a_series_of_one_or_two_steps(self):
        import evaluate
        for T in (1, 2, 3):
            tr = Trace("t", "x", np.tile(np.array([1, 1, 0, 0, 0.1, 0.3, 0.2, 0], np.float32), (T, 1)), [], 0.5)
            self.assertEqual(len(evaluate.calibrated_rule(tr)), T)

    def test_a_column_named_twice_and_a_rate_in_percent_are_refused(self):
        with tempfile.TemporaryDirectory() as d:
            # A recording whose p_anomaly column was renamed p99_over_sla: the second one
            # was read as p99, silently.
            p = self.write(d, [self.row(0) + ",0.9"],
                          header="time_s," + ",".join(FEATURES) + ",label,split,p99_over_sla")
            with self.assertRaisesRegex(ValueError, r"t.csv:1: column p99_over_sla appears 2 times "
                                                    r"\(columns 7, 12\)"):
                read_csv(p)
            p = self.write(d, [self.row(0, success="100")])
            with self.assertRaisesRegex(ValueError, r"t.csv:2: column success_rate: above 1: '100' "
                                                    r"\(a rate is a share of calls"):
                read_csv(p)
            read_csv(self.write(d, [self.row(0, success="1.0"), self.row(1, success="0.25")]))

    def test_minute_data_a_little_early_is_scored_by_the_minute_rules(self):
        # A median step of 59.99 s (a scraper's skew) put a week of minute data under the
        # 500 ms rules: H = 20, a 40-step grace, a model's recall moved from 0.00 to 1.00.
        from traces import grace, headline_horizon, horizons
        tr = Trace("t", "recorded", np.zeros((10, 8), np.float32), [], 59.994, meta={"own": True})
        self.assertEqual((headline_horizon(59.994), horizons(59.994)[-1], grace(tr)), (6, 12, 3))
        self.assertEqual((headline_horizon(5.0), grace(Trace("t", "r", tr.X, [], 5.0))), (20, 40))
        # Nor does a 30 s scrape written a little early: 29.99 s and 30 s are the same data,
        # under the same rules (until 4 December the boundary was 30 s, and they were not); a
        # 15 s scrape is scored as ticks.
        self.assertEqual([headline_horizon(s) for s in (29.99, 30.0, 30.01, 15.0, 14.99, 15.01)],
                         [6, 6, 6, 20, 20, 20])

    def test_what_the_protocol_does_not_count_and_a_short_validation_part_are_noted(self):
        import contextlib
        import io
        import evaluate
        import traces
        X = np.full((3000, 8), 0.1, dtype=np.float32)
        X[:, 1] = 1.0

        def said(trs, own_val=True):
            traces.NOTES.clear()
            with contextlib.redirect_stderr(io.StringIO()):
                evaluate.input_notes("svc", trs, own_val)
            return " | ".join(traces.NOTES)

        # Minute steps: a validation part of 1,000 steps is 16.7 hours; an incident from the
        # validation part into the test part, and one to count.
        tr = Trace("c", "x", X, [(1990, 2010), (2500, 2510)], 60.0, None, 1000, 2000)
        n = said([tr])
        self.assertIn("1 incident(s) begin before their test part and run into it", n)
        self.assertNotIn("no incident in its test data", n)
        self.assertIn("thresholds are chosen on 16", n)
        self.assertIn("hours of normal validation data", n)
        # A day of them: no note; thresholds from the simulator's validation: no note either.
        day = Trace("c", "x", np.tile(X, (2, 1)), [], 60.0, None, 1000, 2600)
        self.assertNotIn("normal validation data", said([day]))
        self.assertIn("no incident in its test data", said([day]))
        self.assertNotIn("normal validation data", said([tr], own_val=False))

    def test_labels_mostly_1_are_noted(self):
        import contextlib
        import io
        import traces
        lines = [f"{t * 60},{','.join('0.5' for _ in FEATURES)},{int(t % 50 != 0)}" for t in range(200)]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "t.csv")
            with open(path, "w") as f:
                f.write(f"time_s,{','.join(FEATURES)},label\n" + "\n".join(lines) + "\n")
            traces.NOTES.clear()
            with contextlib.redirect_stderr(io.StringIO()):
                read_csv(path)
        self.assertTrue(any("label is 1 on 98 % of the rows" in n and "inverted" in n for n in traces.NOTES),
                        traces.NOTES)

    def test_the_ignore_column_marks_steps_anywhere(self):
        def read(incident, ignored):
            """A file of 200 minute steps, labelled where `incident`, ignored where `ignored`."""
            lines = [f"{t * 60},{','.join('0.5' for _ in FEATURES)},{int(incident(t))},{int(ignored(t))}"
                     for t in range(200)]
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "t.csv")
                with open(path, "w") as f:
                    f.write(f"time_s,{','.join(FEATURES)},label,ignore\n" + "\n".join(lines) + "\n")
                return read_csv(path)

        tr = read(lambda t: 150 <= t < 160 or 60 <= t < 70, lambda t: 20 <= t < 40 or 145 <= t < 150)
        self.assertEqual(tr.events, [(60, 69), (150, 159)])
        self.assertEqual(int(tr.ignore.sum()), 25)
        self.assertTrue(tr.ignore[20:40].all())
        # the ignored run right before each onset, and none before the first
        self.assertEqual(tr.pre_ignore, [0, 5])
        # An ignored step is no incident's either (a trial's incident, all under `ignore`, was
        # counted, and warned of early): one all ignored is none; one whose first steps are
        # ignored begins after them, and they are its ignored run before it.
        tr = read(lambda t: 60 <= t < 70 or 150 <= t < 160, lambda t: 55 <= t < 75 or 145 <= t < 153)
        self.assertEqual(tr.events, [(153, 159)])
        self.assertEqual(tr.pre_ignore, [8])
        # Ignored steps later in an incident neither split it nor shorten it.
        tr = read(lambda t: 60 <= t < 80, lambda t: t in (70, 79))
        self.assertEqual(tr.events, [(60, 79)])

    def test_split_of_a_directory_without_csv_files_says_so(self):
        # It wrote nothing and said nothing (exit 0); read_dir said why.
        from traces import split
        with tempfile.TemporaryDirectory() as d:
            open(os.path.join(d, "svc.csv.gz"), "wb").close()
            with self.assertRaisesRegex(ValueError, r"no \.csv files \(svc\.csv\.gz: only plain"):
                split(d)

    def test_the_rolling_z_score_in_chunks_is_the_same(self):
        # All of a long trace's windows at once took 13 kB a step (a 2-million-step trace
        # failed to allocate 7.6 GiB); in chunks, the same scores.
        import evaluate
        X = np.random.default_rng(3).random((700, 8)).astype(np.float32)
        tr = Trace("t", "recorded", X, [], 60.0)
        whole = evaluate.rolling_z(tr)
        chunk, evaluate.CHUNK = evaluate.CHUNK, 100
        try:
            np.testing.assert_array_equal(evaluate.rolling_z(tr), whole)
        finally:
            evaluate.CHUNK = chunk

    def test_the_threshold_search_counts_false_trips_as_the_protocol_does(self):
        # choose_threshold tries every candidate with false_trips_at, one comparison per
        # threshold over all series' normal steps; run_part re-runs the protocol per series.
        import evaluate
        rng = np.random.default_rng(5)
        traces, scores = [], []
        for i in range(6):
            T = int(rng.integers(150, 400))
            events = sorted((int(s), int(s) + int(rng.integers(0, 9)))
                            for s in rng.choice(np.arange(20, T - 10, 25), size=4, replace=False))
            ignore = rng.random(T) < 0.05 if i % 2 else None
            pre = [int(p) for p in rng.integers(0, 5, size=len(events))] if i % 3 == 0 else None
            X = np.zeros((T, 8), dtype=np.float32)
            part = (0, 0) if i in (2, 3) else (T // 3, 2 * T // 3)  # 2, 3: test data only
            traces.append(Trace(f"t{i}", "x", X, events, 60.0 if i < 5 else 30.0, pre, *part,
                                ignore=ignore))
            sc = rng.random(T)
            sc[rng.random(T) < 0.02] = np.nan
            scores.append(sc)
        thresholds = np.linspace(0.0, 1.0, 41)
        for part in ("val", "test"):
            for k in (1, 3):
                per_day, alarmed = evaluate.false_trips_at(traces, scores, part, thresholds, 6, k)
                for thr, d, f in zip(thresholds, per_day, alarmed):
                    r = evaluate.run_part(traces, scores, part, thr, 6, k)
                    self.assertEqual(d, r.false_trips_per_day(), (part, k, thr))
                    self.assertEqual(f, r.summary()["normal_time_alarmed"], (part, k, thr))
                self.assertGreater(per_day.max(), 1.0)  # the check saw false trips
                self.assertTrue((per_day == 0).any())
                thr = evaluate.choose_threshold(traces, scores, 6, 40.0, k, part)
                r = evaluate.run_part(traces, scores, part, thr, 6, k)
                self.assertLessEqual(r.false_trips_per_day(), 40.0)
                self.assertLessEqual(r.summary()["normal_time_alarmed"], evaluate.MAX_ALARMED)
                self.assertGreater(r.summary()["normal_time_alarmed"], 0.0)

    def test_a_score_held_for_k_steps_is_its_alarm_for_k_steps(self):
        from protocol import held
        s = np.array([0.2, 0.9, np.nan, 0.8, 0.7, 0.95, 0.1])
        np.testing.assert_array_equal(held(s, 1), [0.2, 0.9, -np.inf, 0.8, 0.7, 0.95, 0.1])
        np.testing.assert_array_equal(held(s, 2), [-np.inf, 0.2, -np.inf, -np.inf, 0.7, 0.7, 0.1])
        self.assertEqual(alarms(s, 0.7, 3).tolist(), [False] * 5 + [True, False])
        self.assertEqual(held(s[:2], 3).tolist(), [-np.inf, -np.inf])

    def test_a_validation_part_without_normal_steps_is_refused(self):
        # Every candidate passed (no normal time, no false trip): the lowest threshold won and
        # alarmed all of the test part.
        import evaluate
        X = np.random.default_rng(4).random((400, 8)).astype(np.float32)
        tr = Trace("t", "recorded", X, [(90, 320)], 60.0, None, 100, 300)
        with self.assertRaisesRegex(ValueError, "no normal step in the validation part"):
            evaluate.choose_threshold([tr], [X[:, 5].astype(float)], 6, 1.0)

    def test_time_in_milliseconds_is_noted_or_refused(self):
        import contextlib
        import io
        with tempfile.TemporaryDirectory() as d:
            for times, noted in (((0, 500, 1000), True), ((0, 0.5, 1.0), False),
                                 ((0, 60, 120), False), ((0, 300, 600), False),
                                 ((0, 3600, 7200), False)):
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    read_csv(self.write(d, [self.row(t) for t in times]))
                self.assertEqual("divide it by 1000" in err.getvalue(), noted, (times, err.getvalue()))
            # Minutes in milliseconds read as 60,000 s steps made a confident report of 951 days.
            with self.assertRaisesRegex(ValueError, r"t.csv: column time_s moves 60000 a step \(median\), "
                                        r"over an hour: .* divide it by 1000"):
                read_csv(self.write(d, [self.row(t) for t in (0, 60000, 120000)]))

    def test_traces_directories_of_one_name_are_each_reported_under_their_path(self):
        # `--traces prod/svc staging/svc`: the second was dropped from the report, silently.
        from traces import dataset_names
        self.assertEqual(dataset_names(["prod/svc", "staging/svc/", "mine"]),
                         ["svc", "staging/svc", "mine"])
        # Your `nab` is not NAB's section, nor weighted as NAB in training.
        self.assertEqual(dataset_names(["runs/nab"]), ["runs/nab"])
        self.assertEqual(dataset_names(["a/svc", "svc"]), ["svc", os.path.abspath("svc")])
        with self.assertRaisesRegex(ValueError, "^prod/svc: given twice"):
            dataset_names(["prod/svc", "other/svc", "prod/svc"])

    def test_a_directory_read_as_a_dataset_holds_what_its_use_needs(self):
        from traces import read_dataset, split
        X = np.random.default_rng(0).random((100, 8)).astype(np.float32) * 0.9 + 0.1
        with tempfile.TemporaryDirectory() as d:
            write_csv(Trace("a", "x", X, [(40, 45)], 60.0), os.path.join(d, "a.csv"))
            with self.assertRaisesRegex(ValueError, "a: every row is test data .*traces.py split"):
                read_dataset(d, "mine", need=("split",))
            self.assertEqual(len(read_dataset(d, "mine", need=("test",))), 1)
            with self.assertRaisesRegex(ValueError, "^no train rows; python traces.py split"):
                read_dataset(d, "mine", need=("train",))
            split(d, 0.2, 0.2)
            (tr,) = read_dataset(d, "mine", need=("split", "train", "val", "test"))
            self.assertEqual((tr.dataset, tr.val_from, tr.test_from), ("mine", 60, 80))
            # Train and val rows only; then train and test.
            write_csv(Trace("a", "x", X, [(40, 45)], 60.0, None, 60, 100), os.path.join(d, "a.csv"))
            with self.assertRaisesRegex(ValueError, "^no test data"):
                read_dataset(d, "mine", need=("test",))
            write_csv(Trace("a", "x", X, [(40, 45)], 60.0, None, 80, 80), os.path.join(d, "a.csv"))
            with self.assertRaisesRegex(ValueError, r"^no validation part \(no `val` rows\)"):
                read_dataset(d, "mine", need=("split", "train", "test", "val"))
            # Minute steps and 500 ms ticks are scored by different rules: one directory, one.
            write_csv(Trace("b", "x", X, [(40, 45)], 0.5, None, 60, 80), os.path.join(d, "b.csv"))
            with self.assertRaisesRegex(ValueError, r"steps of 0.5 s \(b\) and 60 s \(a\)"):
                read_dataset(d, "mine")
            # A file of one row has no step of its own: it takes its directory's.
            write_csv(Trace("b", "x", X[:1], [], 60.0), os.path.join(d, "b.csv"))
            self.assertEqual([t.step_seconds for t in read_dataset(d, "mine")], [60.0, 60.0])
        # Files too short for `traces.py split` to give a part rows are told so, not sent to it.
        with tempfile.TemporaryDirectory() as d:
            write_csv(Trace("a", "x", X[:1], [], 60.0), os.path.join(d, "a.csv"))
            split(d, 0.2, 0.2)
            with self.assertRaisesRegex(ValueError, r"^no test data .*too short for `traces.py split` "
                                                    r"to give them one \(the longest, a, has 1 rows\)"):
                read_dataset(d, "mine", need=("test",))

    def test_bad_time_labels_splits_and_short_rows_name_the_line(self):
        with tempfile.TemporaryDirectory() as d:
            cases = [
                ([self.row(0), self.row("12:00:01")], r"t.csv:3: column time_s: not a number"),
                ([self.row(1), self.row(0)], r"t.csv:3: column time_s: 0 is not after"),
                ([self.row(0), self.row(1, label="yes")], r"t.csv:3: column label: expected 0 or 1"),
                ([self.row(0), self.row(1, label="nan")], r"t.csv:3: column label: expected 0 or 1"),
                ([self.row(0), self.row(1, split="validation")], r"t.csv:3: column split: expected one of"),
                # Named otherwise in many rows: renamed, not dropped.
                ([self.row(0), self.row(1, split="validation"), self.row(2, split="validation")],
                 r"t.csv:3: column split: expected one of .*: write one of train, val, test in each row\)$"),
                ([self.row(0, split="val"), self.row(1, split="train")], r"t.csv:3: column split: 'train' after 'val'"),
                ([self.row(0), "1,1,1"], r"t.csv:3: 3 fields, the header has 11"),
                # Longer than the header: its values would sit under the wrong names.
                ([self.row(0), self.row(1) + ",7"], r"t.csv:3: 12 fields, the header has 11"),
                ([], r"t.csv: a header and no rows"),
            ]
            for lines, msg in cases:
                with self.assertRaisesRegex(ValueError, msg):
                    read_csv(self.write(d, lines))
            p = os.path.join(d, "t.csv")
            open(p, "w").close()
            with self.assertRaisesRegex(ValueError, r"t.csv: empty file"):
                read_csv(p)
            with open(p, "w") as f:
                f.write(";".join(["time_s", *FEATURES]) + "\n0;1;1;0;0;0;0;0;0\n")
            with self.assertRaisesRegex(ValueError, r"t.csv:1: .*separated by commas"):
                read_csv(p)

    def test_a_trailing_comma_is_read_and_a_file_not_in_utf8_is_named(self):
        with tempfile.TemporaryDirectory() as d:
            p = self.write(d, [self.row(0) + ",", self.row(1) + ",,"])
            self.assertEqual(read_csv(p).T, 2)
            head, row = ",".join(["time_s", *FEATURES]) + "\n", "0,1,1,0,0,0.1,0.2,1,0 caf"
            with open(p, "wb") as f:
                f.write((head + row + "\u00e9\n").encode("latin-1"))
            # the line, and the byte counted from the start of the file
            with self.assertRaisesRegex(ValueError, rf"t.csv:2: not UTF-8 text \(byte {len(head + row)}: invalid"):
                read_csv(p)

    def test_a_public_file_that_cannot_be_read_is_named(self):
        import gzip
        import datasets
        with tempfile.TemporaryDirectory() as d:
            os.makedirs(os.path.join(d, "nab", "labels"))
            for f in ("combined_windows.json", "combined_labels.json"):
                open(os.path.join(d, "nab", "labels", f), "w").close()
            with self.assertRaisesRegex(ValueError, r"combined_windows.json: cannot be read"):
                datasets.load_nab(d)
            os.makedirs(os.path.join(d, "smd_subset"))
            for part in ("train", "test"):
                with gzip.open(os.path.join(d, "smd_subset", f"machine-1-6_{part}.csv.gz"), "wt") as f:
                    f.write("cpu_r,load_1\n0.1,0.2\n")
            with self.assertRaisesRegex(ValueError, r"machine-1-6_train.csv.gz and .*nothing under 'eth1_pi'"):
                datasets.load_smd(d)

    def test_a_file_read_a_chunk_at_a_time_is_the_file_read_whole(self):
        import traces
        rows = [self.row(t, p99=f"{0.1 + (t % 7) / 10:g}", label=str(int(t % 7 == 6)),
                         split="train" if t < 12 else "val" if t < 16 else "test") for t in range(20)]
        with tempfile.TemporaryDirectory() as d:
            p = self.write(d, rows[:9] + [""] + rows[9:])
            whole = read_csv(p)
            chunk, traces.CHUNK_ROWS = traces.CHUNK_ROWS, 3
            try:
                part = read_csv(p)
                np.testing.assert_array_equal(part.X, whole.X)
                self.assertEqual((part.events, part.val_from, part.test_from, part.step_seconds),
                                 (whole.events, whole.val_from, whole.test_from, whole.step_seconds))
                self.assertEqual((whole.val_from, whole.test_from, len(whole.events)), (12, 16, 2))
                # a refused value in a later chunk names its own line (the blank one counted)
                p = self.write(d, rows[:9] + [""] + rows[9:14] + [self.row(14, p99="-1")])
                with self.assertRaisesRegex(ValueError, r"t.csv:17: column p99_over_sla: negative"):
                    read_csv(p)
                p = self.write(d, rows[:13] + [self.row(13, split="val"), self.row(14, split="train")])
                with self.assertRaisesRegex(ValueError, r"t.csv:16: column split: 'train' after 'val'"):
                    read_csv(p)
                p = self.write(d, rows[:6] + ["", ""])
                self.assertEqual(read_csv(p).T, 6)
                p = self.write(d, rows[:7])
                traces.split(d, 0.25, 0.25)
                tr = read_csv(p)
                self.assertEqual((tr.T, tr.val_from, tr.test_from), (7, 3, 5))
            finally:
                traces.CHUNK_ROWS = chunk

    def test_a_blank_line_does_not_shift_the_line_an_error_names(self):
        with tempfile.TemporaryDirectory() as d:
            p = self.write(d, [self.row(0), "", self.row(1, p99="nan")])
            with self.assertRaisesRegex(ValueError, r"t.csv:4: column p99_over_sla"):
                read_csv(p)
            p = self.write(d, [self.row(0, split="val"), "", self.row(1, split="train")])
            with self.assertRaisesRegex(ValueError, r"t.csv:4: column split"):
                read_csv(p)
            # nor does a quoted field with a line break in it (a note column)
            p = self.write(d, [self.row(0) + ',"two\nlines"', self.row(1, p99="x") + ",c"],
                           header="time_s," + ",".join(FEATURES) + ",label,split,note")
            with self.assertRaisesRegex(ValueError, r"t.csv:4: column p99_over_sla"):
                read_csv(p)

    def test_blank_lines_around_the_header_and_a_trailing_comma_on_it_are_read(self):
        head = "time_s," + ",".join(FEATURES) + ",label,split"
        with tempfile.TemporaryDirectory() as d:
            p = self.write(d, ["   ", self.row(0), "  ", self.row(1)], header="\n \n" + head + ",")
            tr = read_csv(p)
            self.assertEqual(tr.T, 2)
            # the header's own line named, not line 1
            p = self.write(d, [self.row(0) + ",1"], header="\n" + head + ",label")
            with self.assertRaisesRegex(ValueError, r"t.csv:2: column label appears 2 times"):
                read_csv(p)
            p = self.write(d, [self.row(0)], header="\n" + head.replace(",p99_over_sla", ""))
            with self.assertRaisesRegex(ValueError, r"t.csv:2: missing column\(s\) p99_over_sla"):
                read_csv(p)
            p = self.write(d, [self.row(0)], header=",,,")
            with self.assertRaisesRegex(ValueError, r"t.csv:1: the header names no column"):
                read_csv(p)

    def test_a_wide_file_is_read_in_chunks_of_fewer_rows(self):
        import traces
        head = "time_s," + ",".join(FEATURES) + ",label,split," + ",".join(f"x{i}" for i in range(40))
        rows = [self.row(t, p99=f"{0.1 + t / 10:g}") + ",7" * 40 for t in range(9)]
        with tempfile.TemporaryDirectory() as d:
            p = self.write(d, rows, header=head)
            whole = read_csv(p)
            cells, traces.CHUNK_CELLS = traces.CHUNK_CELLS, 100  # rows of 51 fields: one a chunk, then two
            try:
                with traces._rows(p) as (_, _, chunks):
                    self.assertEqual([len(lines) for lines, _ in chunks], [1] * 9)
                traces.CHUNK_CELLS = 120
                with traces._rows(p) as (_, _, chunks):
                    self.assertEqual([len(lines) for lines, _ in chunks], [2, 2, 2, 2, 1])
                np.testing.assert_array_equal(read_csv(p).X, whole.X)
            finally:
                traces.CHUNK_CELLS = cells

    def test_a_column_the_harness_reads_in_other_case_is_refused(self):
        # A `Label` was read as an unknown column: the incidents came from the breach rule and
        # the labelled ones were scored as normal time, without a word.
        with tempfile.TemporaryDirectory() as d:
            for col, want in (("Label", "label"), ("Split", "split"), ("TIME_S", "time_s"),
                              ("Ignore", "ignore")):
                header = "time_s," + ",".join(FEATURES) + ",label,split"
                header = header.replace(want, col) if want != "ignore" else header + f",{col}"
                rows = [self.row(t) + (",0" if want == "ignore" else "") for t in range(3)]
                with self.assertRaisesRegex(ValueError, rf"t.csv:1: column '{col}' would not be read: the "
                                                        rf"columns' names are lower case, without spaces \('{want}'\)"):
                    read_csv(self.write(d, rows, header=header))
            # beside the column itself, another spelling is not read, and said so
            import contextlib
            import io
            import traces
            traces.NOTES.clear()
            with contextlib.redirect_stderr(io.StringIO()):
                read_csv(self.write(d, [self.row(t) + ",x" for t in range(3)],
                                    header="time_s," + ",".join(FEATURES) + ",label,split,Label"))
            self.assertEqual(traces.NOTES, [f"{d}/t.csv:1: column 'Label' is not read ('label' is)"])
            traces.NOTES.clear()

    def test_a_rounding_below_0_reads_as_0_and_a_negative_value_is_refused(self):
        with tempfile.TemporaryDirectory() as d:
            # 1 - success - timeout in floating point
            tr = read_csv(self.write(d, [self.row(0), self.row(1).replace(",0,0,0.1,", ",-1.1102230246251565e-16,0,0.1,", 1)]))
            self.assertEqual(float(tr.X[1, 2]), 0.0)
            with self.assertRaisesRegex(ValueError, r"t.csv:3: column error_rate: negative: '-0.001'"):
                read_csv(self.write(d, [self.row(0), self.row(1).replace(",0,0,0.1,", ",-0.001,0,0.1,", 1)]))

    @staticmethod
    def calls(T=100):
        """[T, 8] features whose rates are shares of the same calls (success 1)."""
        X = np.random.default_rng(0).random((T, 8)).astype(np.float32) * 0.9 + 0.1
        X[:, 1], X[:, 2], X[:, 3] = 1.0, 0.0, 0.0
        return X

    def test_a_csv_extension_in_any_case_is_read_and_two_files_of_one_name_are_refused(self):
        import contextlib
        import io
        from traces import read_dir
        X = self.calls()
        with tempfile.TemporaryDirectory() as d:
            write_csv(Trace("a", "x", X, [], 0.5), os.path.join(d, "a.csv"))
            write_csv(Trace("b", "x", X, [], 0.5), os.path.join(d, "b.CSV"))
            with contextlib.redirect_stderr(io.StringIO()):
                self.assertEqual([t.name for t in read_dir(d)], ["a", "b"])
            write_csv(Trace("a", "x", X, [], 0.5), os.path.join(d, "a.Csv"))
            with self.assertRaisesRegex(ValueError, r"a.Csv and a.csv would both be the trace 'a': rename one"):
                read_dir(d)

    def test_a_directory_is_split_whole_or_not_at_all_and_far_apart_steps_are_noted(self):
        import contextlib
        import io
        import traces
        from traces import read_dataset
        X = self.calls()
        with tempfile.TemporaryDirectory() as d:
            write_csv(Trace("a", "x", X, [(40, 45)], 60.0, None, 60, 80), os.path.join(d, "a.csv"))
            hourly = os.path.join(d, "b.csv")
            write_csv(Trace("b", "x", X, [(40, 45)], 3600.0, None, 60, 80), hourly)
            traces.NOTES.clear()
            with contextlib.redirect_stderr(io.StringIO()):
                read_dataset(d, "x")
            self.assertIn("steps of 60 s (a) and 3600 s (b) are scored as one dataset", traces.NOTES[-1])
            traces.NOTES.clear()
            with open(hourly) as f:
                rows = [r.rsplit(",", 1)[0] for r in f.read().splitlines()]
            with open(hourly, "w") as f:
                f.write("\n".join(rows) + "\n")
            with self.assertRaisesRegex(ValueError, r"b has no split column and a has one: split every "
                                                    r"file or none \(python traces.py split"):
                with contextlib.redirect_stderr(io.StringIO()):
                    read_dataset(d, "x")
            traces.NOTES.clear()

    def test_a_directory_given_as_dot_goes_by_its_own_name(self):
        from traces import dataset_names
        with tempfile.TemporaryDirectory() as d:
            cwd = os.getcwd()
            os.chdir(d)
            try:
                self.assertEqual(dataset_names(["."]), [os.path.basename(os.path.realpath(d))])
            finally:
                os.chdir(cwd)

    def test_a_byte_order_mark_and_spaces_in_the_header_are_read(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "t.csv")
            with open(p, "w", encoding="utf-8-sig") as f:
                f.write(", ".join(["time_s", *FEATURES]) + "\n")
                f.write("\n".join(f"{60 * t},1,1,0,0,0.1,0.2,1,0" for t in range(10)) + "\n")
            self.assertEqual(read_csv(p).step_seconds, 60.0)


if __name__ == "__main__":
    unittest.main()


class Calibration(unittest.TestCase):
    """The port of the breaker's calibrated threshold (calibrate.py)."""

    @staticmethod
    def scores(n, centre=-3.0, seed=7):
        """The Rust unit test's sequence: logistic noise on the logit scale around `centre`."""
        import math
        out = []
        for _ in range(n):
            seed = (seed * 6364136223846793005 + 1442695040888963407) % 2**64
            u = min(max((seed >> 11) / 2**53, 1e-9), 1 - 1e-9)
            out.append(1 / (1 + math.exp(-(centre + 0.5 * math.log(u / (1 - u))))))
        return out

    def test_scores_as_used_leave_out_a_series_padded_start(self):
        # What the harness scores a model (and screen.py a statistic) on, and calibrate.alarms
        # learns from: nothing before the breaker would take a prediction.
        from calibrate import UNUSED_STEPS, as_used
        s = np.linspace(0, 1, 100, dtype=np.float32)
        out = as_used(s)
        self.assertEqual(out.dtype, np.float32)  # the scores' own precision (thresholds on them)
        self.assertTrue(np.isnan(out[:UNUSED_STEPS]).all())
        np.testing.assert_array_equal(out[UNUSED_STEPS:], s[UNUSED_STEPS:])
        self.assertEqual(s[0], 0.0)  # a copy: the scores themselves are left as they were
        self.assertEqual(as_used(np.arange(100)).dtype, np.float64)

    def test_warms_up_then_keeps_the_budget(self):
        from calibrate import Calibrator
        c = Calibrator(1.0, 0.5, 3600)
        s = self.scores(3600 + 172_800)
        for p in s[:3599]:
            c.observe(p)
        self.assertIsNone(c.threshold())
        c.observe(s[3599])
        trips, above = 0, False
        for p in s[3600:]:
            t = c.threshold()
            if p >= t and not above:
                trips += 1
            above = p >= t
            c.observe(p)
        self.assertLessEqual(trips, 5)

    def test_says_when_its_threshold_first_holds(self):
        import calibrate
        # The first step whose score is compared with a threshold: after the series' unused
        # start, 2,500 learnt scores and the 40 steps each waits to be learnt; a series
        # shorter than that never arms (evaluate.py's report says so).
        s = np.array(self.scores(4000))
        armed = []
        calibrate.alarms(s, np.ones(4000, bool), 0.5, 2500, armed=armed)
        self.assertEqual(armed, [calibrate.UNUSED_STEPS + 2500 + calibrate.FALSE_ALARM_TICKS])
        calibrate.alarms(s[:2600], np.ones(2600, bool), 0.5, 2500, armed=armed)
        self.assertEqual(armed[1:], [None])

    def test_a_classical_detector_is_calibrated_per_series_as_the_default_is(self):
        # evaluate.py puts every classical detector beside the default under the default's
        # rule: its score s read as the probability s / (1 + s) (logit ln s: the calibration
        # reads the order of a series' scores, so the threshold is one on s), calibrated per
        # series, no labels, k = 2.
        import calibrate
        import evaluate
        p = evaluate.as_probability(np.array([0.0, 1.0, 3.0, np.nan, -2.0]))
        np.testing.assert_allclose(p[:3], [0.0, 0.5, 0.75])
        self.assertTrue(np.isnan(p[3]))
        self.assertEqual(p[4], 0.0)  # never below 0
        self.assertAlmostEqual(calibrate.logit(float(p[2])), np.log(3.0), places=9)
        # Minute steps: a long healthy stretch of noise, then a shift that holds for 5 steps
        # before a breach. The static z-score sees the shift; its own threshold, calibrated
        # from the series' healthy steps, warns of the breach with no threshold chosen by hand.
        rng = np.random.default_rng(5)
        T, onset = 6000, 5500
        X = np.tile(np.array([1, 1, 0, 0, 0.1, 0.3, 0.2, 0.03], np.float32), (T, 1))
        X[:, 5] += rng.normal(0, 0.01, T).astype(np.float32)
        X[onset - 5:onset, 5] = 0.8
        X[onset:onset + 5, 5], X[onset:onset + 5, 1] = 2.0, 0.5  # the breach: unhealthy
        tr = Trace("svc", "x", X, breach_events(X), 60.0, None, 4000, 5000)
        self.assertEqual(tr.events, [(onset, onset + 4)])
        sc = evaluate.static_z(tr)
        armed = []
        alarms = evaluate.calibrated_alarms(tr, evaluate.as_probability(sc), armed)
        self.assertEqual(armed, [calibrate.UNUSED_STEPS + evaluate.WARM_UP + calibrate.FALSE_ALARM_TICKS])
        rows = [dict(detector="static robust z", H=H, auprc=0.5, base_rate=0.01)
                for H in evaluate.horizons(60.0)]
        out = evaluate.default_rows("svc", [tr], [alarms], evaluate.calibrated_name("static robust z"),
                                    armed, rows, "static robust z", calibrated_of="static robust z")
        head = next(r for r in out if r["H"] == 6)
        self.assertEqual(head["detector"], "static robust z, calibrated per series as the default")
        # held a second, as the breaker's default: one minute step
        self.assertEqual((head["k"], head["calibrated_of"], head["series"], head["unarmed"]),
                         (1, "static robust z", 1, 0))
        self.assertEqual((head["early"], head["events"], head["false_trips"]), (1, 1, 0))
        # It is in the headline table, beside the default (a never-armed one says so).
        text = evaluate.table(out + [dict(head, detector=evaluate.AS_DEFAULT, unarmed=1)], "svc", 6, 1, 1.0)
        self.assertIn("| static robust z, calibrated per series as the default | 1.00 [1.00, 1.00] |", text)
        self.assertIn(f"| {evaluate.AS_DEFAULT} | never armed |", text)

    def test_agrees_with_the_rust_calibrator(self):
        # `breaker::calibrate::tests::the_python_port_agrees` computes the same threshold.
        from calibrate import Calibrator
        c = Calibrator(1.0, 0.5, 3600)
        for p in self.scores(5000):
            c.observe(p)
        self.assertAlmostEqual(c.threshold(), RUST_THRESHOLD, places=9)


    def test_runs_of_excesses_lower_the_threshold_as_the_rust_one_does(self):
        # `breaker::calibrate::tests::scores_that_move_in_runs_get_a_lower_threshold_...`: the
        # same scores each held for 8 steps; the extremal index is about 1/8.
        from calibrate import Calibrator
        c = Calibrator(1.0, 0.5, 3600)
        for p in self.scores(3600):
            for _ in range(8):
                c.observe(p)
        self.assertLess(c._theta(), 0.2)
        self.assertAlmostEqual(c.threshold(), 0.8459509693092662, places=9)

    def test_tied_scores_fit_as_the_rust_ones_do(self):
        # `breaker::calibrate::tests::tied_scores_still_give_the_first_fit_its_fifty_...`: a
        # model whose healthy scores take three values and a few more.
        import math
        from calibrate import MIN_PEAKS, Calibrator, logit
        c = Calibrator(1.0, 0.5, 3600)
        for i in range(3600):
            r = (i * 37) % 100
            c.observe(0.0046 if r < 75 else 0.0265 if r < 87 else 0.0043 if r < 99
                      else 0.03 + 0.004 * ((i // 100) % 10))
        self.assertGreaterEqual(len(c.peaks), MIN_PEAKS)
        self.assertEqual(c.start, logit(0.0046))
        self.assertAlmostEqual(c.threshold(), TIED_THRESHOLD, places=9)
        self.assertTrue(math.isfinite(c.threshold()))

    def test_a_score_that_never_moves_is_never_over_the_threshold_as_in_rust(self):
        # `breaker::calibrate::tests::a_class_whose_healthy_score_never_moves_is_never_...`: a
        # flat series with one run of high healthy scores in its warm-up; on minute steps the
        # fit fell on the usual score at arming and tripped the class on it.
        from calibrate import Calibrator
        for step in (0.5, 60.0):
            c = Calibrator(1.0, step, 3600)
            for i in range(20_000):
                if c.threshold() is not None:
                    self.assertFalse(c.exceeds(0.01), (step, i, c.threshold()))
                c.observe(0.5 if 1000 <= i < 1020 else 0.01)
            self.assertIsNotNone(c.threshold())
            self.assertTrue(c.exceeds(0.9999), (step, c.threshold()))

    def test_a_false_alarm_puts_the_threshold_above_its_scores_as_the_rust_one_does(self):
        # `breaker::calibrate::tests::a_false_alarm_puts_the_threshold_above_its_scores_for_an_hour_...`
        from calibrate import Calibrator
        c = Calibrator(1.0, 0.5, 3600)
        for p in self.scores(5000):
            c.observe(p)
        self.assertTrue(c.exceeds(0.97))
        c.false_alarm(0.97)
        self.assertFalse(c.exceeds(0.97))
        self.assertAlmostEqual(c.threshold(), 0.9764798976612756, places=9)

    def test_a_false_alarm_holds_an_hour_whatever_the_step(self):
        # `breaker::calibrate::tests::a_false_alarm_holds_an_hour_whatever_the_tick`: 3,600
        # healthy steps of 1 s, 60 of a minute (7,200 steps at every step before).
        from calibrate import Calibrator
        for step, hour in ((1.0, 3600), (60.0, 60), (0.5, 7200)):
            c = Calibrator(1.0, step, 3600)
            s = self.scores(5000 + 2 * hour)
            for p in s[:5000]:
                c.observe(p)
            c.false_alarm(0.995)
            for p in s[5000:5000 + hour - 50]:
                c.observe(p)
            self.assertFalse(c.exceeds(0.995), f"held at {step} s")
            for p in s[5000 + hour - 50:5000 + hour + 50]:
                c.observe(p)
            self.assertTrue(c.exceeds(0.995), f"released at {step} s")

    def test_an_alarm_the_class_does_not_confirm_ends_and_raises_the_threshold(self):
        import numpy as np
        from calibrate import FALSE_ALARM_TICKS, alarms
        # Healthy all along: a warm-up at 0.05 (3,000 steps, each learnt FALSE_ALARM_TICKS
        # steps later), then a level shift to 0.6 that never breaks anything. The alarm lasts
        # FALSE_ALARM_TICKS steps, then the threshold is above 0.6.
        # (The first UNUSED_STEPS steps, zero-padded in a model's input, are neither acted on
        # nor learnt: `pad` of them first.)
        from calibrate import UNUSED_STEPS
        rng = np.random.default_rng(1)
        warm = 1 / (1 + np.exp(-(-3 + 0.3 * rng.standard_normal(3100))))
        pad = np.full(UNUSED_STEPS, 0.99)
        scores = np.concatenate([pad, warm, np.full(300, 0.6)])
        shift = 3100 + len(pad)
        out = alarms(scores, np.ones(len(scores), bool), 0.5, 3000)
        self.assertEqual(int(out[:shift].sum()), 0)
        self.assertEqual(int(out[shift:].sum()), FALSE_ALARM_TICKS)
        # The same shift with the class breaching (unhealthy) is confirmed: it stays.
        healthy = np.ones(len(scores), bool)
        healthy[shift + 10:] = False
        out = alarms(scores, healthy, 0.5, 3000)
        self.assertEqual(int(out[shift:].sum()), 299)

    def test_warnings_that_come_and_go_are_one_false_alarm(self):
        import numpy as np
        from calibrate import FALSE_ALARM_TICKS, alarms
        # After the warm-up, a score flapping about the threshold: 0.6 for 4 steps, back to
        # the healthy level for 6, and again. Each warning was shorter than the exit, so none
        # was a false alarm and the flapping went on for good; now the warnings are one alarm,
        # and FALSE_ALARM_TICKS healthy steps after it began the threshold is above them.
        from calibrate import UNUSED_STEPS
        rng = np.random.default_rng(1)
        warm = 1 / (1 + np.exp(-(-3 + 0.3 * rng.standard_normal(3100 + UNUSED_STEPS))))
        flap = np.tile(np.r_[np.full(4, 0.6), np.full(6, 0.05)], 40)
        scores = np.concatenate([warm, flap])
        shift = len(warm)
        out = alarms(scores, np.ones(len(scores), bool), 0.5, 3000)
        self.assertEqual(int(out[:shift].sum()), 0)
        self.assertGreater(int(out[shift:].sum()), 0)
        self.assertEqual(int(out[shift + FALSE_ALARM_TICKS:].sum()), 0)

    def test_a_warning_some_way_after_a_false_one_gets_its_own_alarm(self):
        import numpy as np
        from calibrate import MERGE_GAP, alarms
        from calibrate import UNUSED_STEPS
        # A short warning, 34 quiet steps, then a real precursor: merged into the first, it
        # was judged a false alarm 40 steps after the first began and ended before its breach.
        rng = np.random.default_rng(1)
        warm = 1 / (1 + np.exp(-(-3 + 0.3 * rng.standard_normal(3100 + UNUSED_STEPS))))
        scores = np.concatenate([warm, np.full(3, 0.25), np.full(34, 0.05), np.full(30, 0.9)])
        # (the first is judged apart, a false alarm: the threshold goes above 0.25, not to
        # 0.9; the breach then lifts that floor, within the first warning's verdict)
        second = len(warm) + 37
        healthy = np.ones(len(scores), bool)
        healthy[second + 12:] = False  # the breach the precursor warned of
        self.assertGreater(34, MERGE_GAP)
        out = alarms(scores, healthy, 0.5, 3000)
        self.assertTrue(out[len(warm) + 1], "the first warning")
        self.assertTrue(out[second + 1:].all(), "the precursor's alarm lasts into the breach")

    def test_a_warnings_own_scores_are_learnt_and_the_same_level_does_not_trip_again(self):
        # Minute steps (held one step; a false alarm's floor holds 60 of them): 40 steps at
        # 0.6, every one of them a warning, judged false; 80 quiet ones, past the floor's hour
        # and past the 40 steps each score waits to be learnt; then 0.6 again. The warning's
        # scores, learnt, lifted the fitted tail above 0.6 (left out, as every score over the
        # threshold was until 5 December, the fit stayed below it and the class tripped on
        # the same level once an hour). `breaker`'s Degraded phase learns them the same way.
        from calibrate import UNUSED_STEPS, alarms
        rng = np.random.default_rng(2)
        warm = 1 / (1 + np.exp(-(-3 + 0.3 * rng.standard_normal(2600 + UNUSED_STEPS + 40))))
        scores = np.concatenate([warm, np.full(40, 0.6), np.full(80, 0.05), np.full(3, 0.6)])
        out = alarms(scores, np.ones(len(scores), bool), 60.0, 2600)
        n = len(warm)
        self.assertTrue(out[n:n + 40].all(), "one step held: each a warning")
        self.assertFalse(out[n + 40:].any(), "judged false, then learnt")

    def test_a_prediction_is_held_a_second_whatever_the_step(self):
        # `BreakerConfig::predict_ticks_at`'s default: the steps that make up PREDICT_HOLD.
        from calibrate import predict_ticks
        self.assertEqual([predict_ticks(s) for s in (0.5, 1.0, 60.0, 300.0, 0.25, 0.3)], [2, 1, 1, 1, 4, 4])
        s = np.concatenate([np.full(3000, 0.01), [0.9], np.full(5, 0.01)])
        from calibrate import alarms
        self.assertTrue(alarms(s, np.ones(len(s), bool), 60.0, 2500)[3000], "one minute step")
        self.assertFalse(alarms(s, np.ones(len(s), bool), 0.5, 2500).any(), "one 500 ms step")

    def test_a_warning_holds_while_its_scores_stay_in_the_tail_as_the_rust_one_does(self):
        # The breaker's `a_calibrated_warning_holds_while_its_scores_stay_in_the_class_s_tail`:
        # a score hovering under the threshold but over the class's usual ones (3 sd, with a
        # tick over the threshold now and then) after a warning; each tick under the threshold
        # ended the warning, and the class flapped. Now it holds until the score is back among
        # the usual ones, or until the false-alarm exit.
        from calibrate import FALSE_ALARM_TICKS, UNUSED_STEPS, alarms, sigmoid
        rng = np.random.default_rng(1)
        warm = 1 / (1 + np.exp(-(-3 + 0.3 * rng.standard_normal(3100 + UNUSED_STEPS))))
        tail = sigmoid(-3 + 3 * 0.3)
        hover = np.where(np.arange(30) % 6 == 5, 0.9, tail)
        n = len(warm)
        scores = np.concatenate([warm, [0.9, 0.9], hover, warm[-20:]])
        out = alarms(scores, np.ones(len(scores), bool), 0.5, 3000)
        self.assertFalse(out[:n + 1].any())
        self.assertTrue(out[n + 1:n + 32].all(), "held through the hover")
        self.assertFalse(out[n + 32:].any(), "ended with the usual scores")
        # Under the threshold: alone, no tick of the hover warns.
        alone = alarms(np.concatenate([warm, np.full(30, tail)]), np.ones(n + 30, bool), 0.5, 3000)
        self.assertFalse(alone.any())
        # Held no longer than the false-alarm exit.
        scores = np.concatenate([warm, [0.9, 0.9], np.full(100, tail)])
        out = alarms(scores, np.ones(len(scores), bool), 0.5, 3000)
        self.assertEqual(int(out.sum()), FALSE_ALARM_TICKS)
        self.assertTrue(out[n + 1:n + 1 + FALSE_ALARM_TICKS].all())

    def test_a_hold_follows_the_class_s_usual_scores_as_the_rust_one_does(self):
        # The breaker's `a_warning_holds_over_the_usual_scores_the_class_has_now`. After a
        # lasting shift of the healthy scores (logit -3 to -1.5, learnt), the warm-up's tail
        # start is below every usual score: a hold over it lasted to the false-alarm exit. The
        # level held over is the fit's 98th percentile, which moves with the class.
        from calibrate import UNUSED_STEPS, alarms
        rng = np.random.default_rng(3)

        def calm(centre, n):
            return 1 / (1 + np.exp(-(centre + 0.3 * rng.standard_normal(n))))

        scores = np.concatenate([calm(-3, 3100 + UNUSED_STEPS), calm(-1.5, 28_800)])
        n = len(scores)
        scores = np.concatenate([scores, [0.95, 0.95], calm(-1.5, 60)])
        out = alarms(scores, np.ones(len(scores), bool), 0.5, 3000)
        self.assertFalse(out[n - 7200:n].any(), "the shift is learnt")
        self.assertTrue(out[n + 1])
        self.assertLessEqual(int(out[n + 2:].sum()), 2, "back among the usual scores")

    def test_a_hold_is_over_a_false_alarm_s_scores_while_its_floor_holds(self):
        # The breaker's `a_warning_holds_over_a_false_alarm_s_scores_not_at_them`: a false
        # alarm at 0.6 puts the threshold above it for an hour; a warning over that floor,
        # then 0.6 again, held at 0.6 (over the class's usual scores) until the exit: the
        # level already judged benign cost 40 steps more.
        from calibrate import FALSE_ALARM_TICKS, UNUSED_STEPS, alarms
        rng = np.random.default_rng(1)
        warm = 1 / (1 + np.exp(-(-3 + 0.3 * rng.standard_normal(3100 + UNUSED_STEPS))))
        n = len(warm)
        scores = np.concatenate([warm, np.full(45, 0.6), [0.99, 0.99], np.full(60, 0.6)])
        out = alarms(scores, np.ones(len(scores), bool), 0.5, 3000)
        self.assertEqual(int(out[n:n + 45].sum()), FALSE_ALARM_TICKS, "the false alarm")
        self.assertTrue(out[n + 46], "a warning over its floor")
        self.assertFalse(out[n + 47:].any(), "not held at the benign level")

    def test_a_breach_ends_a_hold_and_its_echo_neither_warns_nor_lifts_the_threshold(self):
        # The breaker's `a_breach_confirms_a_held_warning_and_the_class_recovers_as_from_any`
        # and `an_incident_s_echo_does_not_lift_the_threshold_over_a_relapse`: a warning held,
        # a breach, then scores over the threshold on healthy steps. For ECHO_TICKS steps
        # they may read the breach (its echo): they do not predict, so the class closes after
        # 3 and no alarm starts to be taken for false; they are learnt no higher than the
        # tail's start. Past the echo the same level warns again: no false alarm's
        # floor, and the threshold was not lifted (learnt as they were, the echo's scores
        # lifted it near 1, and a relapse at 0.9 went unwarned).
        from calibrate import ECHO_TICKS, UNUSED_STEPS, alarms, sigmoid
        rng = np.random.default_rng(1)
        warm = 1 / (1 + np.exp(-(-3 + 0.3 * rng.standard_normal(3100 + UNUSED_STEPS))))
        n = len(warm)
        tail = sigmoid(-3 + 3 * 0.3)
        scores = np.concatenate([warm, [0.9, 0.9], np.full(10, tail), np.full(ECHO_TICKS, 0.9),
                                 warm[:300], [0.9, 0.9]])
        healthy = np.ones(len(scores), bool)
        b = n + 11
        healthy[b] = False  # the breach, at the hold's last step
        trace = []
        out = alarms(scores, healthy, 0.5, 3000, trace=trace)
        self.assertTrue(out[n + 1:b + 1].all(), "predicting through the hold and the breach")
        self.assertFalse(out[b + 1:-1].any(), "the echo, and the usual scores after it")
        self.assertEqual([d for _, _, _, d in trace[b + 1:b + 5]], [True, True, False, False],
                         "closed after 3 healthy steps")
        before, after = trace[b][2], trace[-3][2]
        self.assertLess(after, 0.3, f"the threshold went from {before} to {after}")
        self.assertTrue(out[-1], "a relapse warned of")

    def test_the_breakers_replay_of_the_port_is_up_to_date(self):
        # `tower-degrade/tests/breaker/main.rs` (`the_python_port_takes_the_breakers_steps`)
        # replays port_fixture.py's series through the breaker and checks it takes the port's
        # steps: the committed file must be what the port makes of the series now.
        import port_fixture
        with open(port_fixture.OUT) as f:
            committed = f.read()
        self.assertEqual(committed, port_fixture.text(),
                         "run `python port_fixture.py` (then the breaker's test) after changing calibrate.py")
        short, minute = json.loads(committed)["series"]
        # What the series are for: warnings, some closed by a false alarm, a threshold that
        # moves, incidents the degrade rule takes; at minute steps, floors put and lifted.
        self.assertEqual((short["step_ms"], minute["step_ms"]), (500, 60_000))
        self.assertGreater(len(short["warned"]), 20)
        self.assertGreater(len(short["false_alarm_closed"]), 2)
        self.assertGreater(len(short["thresholds"]), 500)
        self.assertGreater(len(minute["warned"]), 5)
        self.assertGreater(len(minute["thresholds"]), 10)

    def test_a_slow_flap_is_judged_too(self):
        import numpy as np
        from calibrate import MERGE_GAP, UNUSED_STEPS, alarms
        # 0.6 for 3 steps, then 12 quiet ones (more than MERGE_GAP), again and again: each
        # warning an alarm of its own, each judged 40 steps after it began; after the first
        # verdict the threshold is above 0.6 and the flapping trips no more.
        rng = np.random.default_rng(1)
        warm = 1 / (1 + np.exp(-(-3 + 0.3 * rng.standard_normal(3100 + UNUSED_STEPS))))
        flap = np.tile(np.r_[np.full(3, 0.6), np.full(MERGE_GAP + 2, 0.05)], 30)
        scores = np.concatenate([warm, flap])
        out = alarms(scores, np.ones(len(scores), bool), 0.5, 3000)
        self.assertGreater(int(out[len(warm):].sum()), 0)
        self.assertEqual(int(out[len(warm) + 60:].sum()), 0)

    def test_a_slow_leak_warned_minutes_ahead_is_warned_of_again(self):
        # The breaker's `a_slow_leak_warned_minutes_ahead_is_confirmed_by_its_breach_and_warned_
        # of_again`: a score climbing from 0.3 to 0.9 over 250 healthy 500 ms steps, then a
        # breach; twice. Judged after FALSE_ALARM_TICKS steps alone, the first warning was a
        # false alarm, its floor and the climb's scores (learnt) put the threshold above the
        # second leak, which was not warned of. Within VERDICT_SECONDS the breach lifts the
        # floor and no score since the warning is learnt.
        from calibrate import UNUSED_STEPS, alarms, verdict_ticks
        self.assertEqual([verdict_ticks(s) for s in (0.5, 1.0, 60.0)], [600, 300, 40])
        rng = np.random.default_rng(4)

        def calm(n):
            return 1 / (1 + np.exp(-(-3 + 0.3 * rng.standard_normal(n))))

        leak = np.linspace(0.3, 0.9, 250)
        warm = np.concatenate([np.full(UNUSED_STEPS, 0.05), calm(3100)])
        scores = np.concatenate([warm, leak, np.full(10, 0.95), calm(800), leak, np.full(10, 0.95)])
        healthy = np.ones(len(scores), bool)
        first = len(warm)
        second = first + 250 + 10 + 800
        healthy[first + 250:first + 260] = False
        healthy[second + 250:second + 260] = False
        out = alarms(scores, healthy, 0.5, 3000)
        self.assertFalse(out[:first].any())
        self.assertTrue(out[first + 1], "the first leak, at its start")
        self.assertTrue(out[second + 1], "the second, at its start too")
        self.assertFalse(out[first + 260:second].any())

    def test_a_warning_late_in_an_earlier_ones_verdict_is_judged_from_itself(self):
        # The breaker's twin: a false alarm (0.6 for 45 steps), 505 quiet steps, then a leak
        # above its floor that breaches 250 steps later; twice. Judged from the first warning,
        # the wait ended 50 steps into the leak and the second leak was not warned of.
        from calibrate import UNUSED_STEPS, alarms
        rng = np.random.default_rng(4)

        def calm(n):
            return 1 / (1 + np.exp(-(-3 + 0.3 * rng.standard_normal(n))))

        leak = np.linspace(0.7, 0.95, 250)
        warm = np.concatenate([np.full(UNUSED_STEPS, 0.05), calm(3100)])
        parts = [warm, np.full(45, 0.6), calm(505), leak, np.full(10, 0.97), calm(800), leak,
                 np.full(10, 0.97)]
        scores = np.concatenate(parts)
        healthy = np.ones(len(scores), bool)
        first = sum(len(x) for x in parts[:3])
        second = first + 250 + 10 + 800
        healthy[first + 250:first + 260] = False
        healthy[second + 250:second + 260] = False
        out = alarms(scores, healthy, 0.5, 3000)
        self.assertTrue(out[len(warm) + 1], "the false alarm")
        self.assertTrue(out[first + 1], "the first leak, at its start")
        self.assertTrue(out[second + 1], "the second, at its start too")

    def test_the_steps_before_an_unhealthy_one_are_not_learnt(self):
        import numpy as np
        from unittest import mock
        import calibrate
        # The breaker's `the_scores_before_a_breach_are_not_learnt_as_healthy`: the scores of
        # a climb followed by an unhealthy step are never learnt; with no unhealthy step
        # after them they are, FALSE_ALARM_TICKS steps later.
        from calibrate import UNUSED_STEPS
        rng = np.random.default_rng(3)
        warm = 1 / (1 + np.exp(-(-3 + 0.4 * rng.standard_normal(3000))))
        warm = np.concatenate([np.full(UNUSED_STEPS, 0.05), warm])  # the padded steps first
        climb = 1 / (1 + np.exp(-np.linspace(-2.2, -1.0, 30)))
        rest = 1 / (1 + np.exp(-(-3 + 0.4 * rng.standard_normal(60))))
        scores = np.concatenate([warm, climb, rest])
        climbed = set(climb.tolist())

        def learnt(healthy):
            seen = []
            real = calibrate.Calibrator.observe
            with mock.patch.object(calibrate.Calibrator, "observe", autospec=True,
                                   side_effect=lambda c, p, echo=False: (seen.append(p), real(c, p, echo))):
                calibrate.alarms(scores, healthy, 0.5, 2500)
            return sum(p in climbed for p in seen)

        breach = np.ones(len(scores), bool)
        breach[len(warm) + 30] = False  # the step after the climb
        self.assertEqual(learnt(breach), 0)
        self.assertEqual(learnt(np.ones(len(scores), bool)), 30)

# The value both compute (a golden number: change it only with both implementations).
RUST_THRESHOLD = 0.8640452805291023
TIED_THRESHOLD = 0.5087740343887448
