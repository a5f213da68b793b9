"""Tests of the leave-one-dataset-out harness's bookkeeping (NumPy only: no training)."""
import json
import os
import subprocess
import sys
import tempfile
import types
import unittest

import numpy as np

import evaluate
from lodo import (ANCHOR, LODO_NEEDS, _verdict, beyond_chance, child_argv, file_name, headline, merge,
                  pooled, run_all, seeds_report, seeds_table, training_traces)
from traces import Trace, read_datasets, write_csv

LODO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lodo.py")


class Folds(unittest.TestCase):
    def test_a_fold_trains_on_every_dataset_but_the_one_held_out(self):
        sim = ["s1", "s2"]
        pub = {"nab": ["n1"], "nezha": ["z1", "z2"], "smd": ["m1"]}
        self.assertEqual(training_traces("simulated", sim, pub), ["n1", "z1", "z2", "m1"])
        self.assertEqual(training_traces("nezha", sim, pub), ["s1", "s2", "n1", "m1"])
        for held_out in ("nab", "nezha", "smd"):
            self.assertFalse(set(pub[held_out]) & set(training_traces(held_out, sim, pub)))

    def test_your_traces_are_a_fold_of_their_own_and_trained_on_in_the_others(self):
        X = np.random.default_rng(0).random((100, 8)).astype(np.float32) * 0.9 + 0.1
        X[:, 2:4] *= 0.1  # error and timeout rates: with success, shares of the same calls
        X[:, 1] = 1 - X[:, 2] - X[:, 3]
        with tempfile.TemporaryDirectory() as root:
            for d in ("prod/svc", "staging/svc", "nab"):
                os.makedirs(os.path.join(root, d))
                write_csv(Trace("c", "x", X, [(70, 72)], 60.0, None, 60, 80), os.path.join(root, d, "c.csv"))
            paths = [os.path.join(root, d) for d in ("prod/svc", "staging/svc", "nab")]
            own = read_datasets(paths, LODO_NEEDS)
            # Named as evaluate.py's report names them: a name taken goes by its path.
            self.assertEqual(list(own), ["svc", os.path.normpath(paths[1]), os.path.normpath(paths[2])])
            self.assertTrue(all(t.dataset == n for n, trs in own.items() for t in trs))
            pub = {"nab": ["n1"], "nezha": ["z1"], "smd": ["m1"], **own}
            for held_out in own:
                trained = training_traces(held_out, ["s1"], pub)
                self.assertFalse({id(t) for t in own[held_out]} & {id(t) for t in trained})
                self.assertEqual(len(trained), 4 + len(own) - 1)
            self.assertEqual(training_traces("nab", ["s1"], pub), ["s1", "z1", "m1", *own["svc"],
                             *own[os.path.normpath(paths[1])], *own[os.path.normpath(paths[2])]])
            # A directory a held-out fold could not be scored on is refused before any training.
            write_csv(Trace("c", "x", X, [(70, 72)], 60.0, None, 80, 80), os.path.join(paths[0], "c.csv"))
            with self.assertRaisesRegex(ValueError, f"^{paths[0]}: no validation part"):
                read_datasets(paths, LODO_NEEDS)
            with self.assertRaisesRegex(ValueError, "given twice"):
                read_datasets([paths[1], paths[1]])

    def test_a_part_no_threshold_can_be_chosen_on_is_found_before_training(self):
        # lodo.py refuses such a held-out directory before its fold trains (a trial's ran three
        # minutes, then ended in choose_threshold's traceback); check_scorable raises what
        # choose_threshold would.
        import evaluate
        X = np.full((2000, 8), 0.1, dtype=np.float32)
        X[:, 1] = 1.0
        ok = Trace("c", "x", X, [(1700, 1710)], 60.0, None, 1000, 1500)
        evaluate.check_scorable([ok], ranking_check=True)
        # Labels inverted: every validation step in an incident.
        inverted = Trace("c", "x", X, [(0, 1999)], 60.0, None, 1000, 1500)
        with self.assertRaisesRegex(ValueError, "^no normal step in the validation part"):
            evaluate.check_scorable([inverted])
        # A short file: its validation part before the first step a model scores.
        short = Trace("c", "x", X[:50], [], 60.0, None, 30, 40)
        with self.assertRaisesRegex(ValueError, "^no validation step with a score .* holds 10 step"):
            evaluate.check_scorable([short])
        # The whole test part an incident: the ranking check has no normal time.
        late = Trace("c", "x", X, [(1500, 1999)], 60.0, None, 1000, 1500)
        evaluate.check_scorable([late])
        with self.assertRaisesRegex(ValueError, "^no normal step in the test part"):
            evaluate.check_scorable([late], ranking_check=True)

    def test_a_folds_files_are_named_after_its_dataset_even_a_path(self):
        self.assertEqual(file_name("nab"), "nab")
        self.assertEqual(file_name("/srv/traces/staging svc"), "srv_traces_staging_svc")
        self.assertEqual(file_name("/"), "traces")


def row(detector, recall, ci, k=1, budget=1.0, H=6, trips=0.5, events=17):
    return dict(dataset="nab", detector=detector, H=H, k=k, budget_per_day=budget, step_seconds=300.0,
                recall_early=recall, recall_early_ci=ci, false_trips_per_day=trips, events=events,
                test_days=40.0)


class Headline(unittest.TestCase):
    def test_the_best_baseline_is_the_one_with_the_highest_early_recall_at_the_same_rule(self):
        rows = [
            row("model", 0.30, [0.2, 0.4]),
            row("model", 0.9, [0.8, 1.0], k=3),            # another rule: not compared
            row(evaluate.AS_DEFAULT, 0.1, [0.0, 0.2], budget=None),
            row(evaluate.AS_DEPLOYED, 0.9, [0.8, 1.0], budget=None),  # not a baseline
            row("static robust z", 0.20, [0.1, 0.3]),
            row("rolling robust z", 0.25, [0.1, 0.4]),
            row("seed rule", 0.8, [0.7, 0.9], budget=0.1),  # another budget
            row("calibrated rule", 0.9, [0.8, 1.0], H=12),  # another horizon
            row(ANCHOR, 0.5, [0.4, 0.6]),  # the model's own anchor: not a baseline
        ]
        h = headline(rows, "nab", 1.0)
        self.assertEqual(h["anchor"]["recall_early"], 0.5)
        self.assertEqual(h["H"], 6)
        self.assertEqual(h["model"]["recall_early"], 0.30)
        self.assertEqual(h["default"]["detector"], evaluate.AS_DEFAULT)
        self.assertEqual(h["best"]["detector"], "rolling robust z")

    def test_the_verdict_says_by_how_much_and_whether_the_intervals_part(self):
        m = dict(recall_early=0.6, recall_early_ci=[0.5, 0.7], events=40)
        self.assertEqual(_verdict(m, dict(recall_early=0.3, recall_early_ci=[0.2, 0.4])), "2.00x (CIs apart)")
        self.assertEqual(_verdict(m, dict(recall_early=0.5, recall_early_ci=[0.3, 0.6])), "1.20x")
        self.assertEqual(_verdict(dict(recall_early=0.1, recall_early_ci=[0.0, 0.2], events=40),
                                  dict(recall_early=0.5, recall_early_ci=[0.3, 0.6])), "0.20x (CIs apart, below)")
        self.assertEqual(_verdict(m, dict(recall_early=0.0, recall_early_ci=[0.0, 0.0])), "ahead")
        # Over a few incidents, all missed against all warned of, the intervals are [0, 0] and
        # [1, 1]: apart, and saying nothing of how unsure either is.
        few = dict(recall_early=0.5, recall_early_ci=[0.0, 1.0], events=6)
        self.assertEqual(_verdict(few, dict(recall_early=1.0, recall_early_ci=[1.0, 1.0])), "0.50x (over 6 incidents)")
        # No test incident at all: nothing measured (a trial's report read "0.00 [0.00, 0.00]"
        # and "both 0", where evaluate.py's says "–").
        from lodo import _recall
        none = dict(recall_early=0.0, recall_early_ci=[0.0, 0.0], events=0)
        self.assertEqual(_verdict(none, none), "no test incident")
        self.assertEqual(_recall(none), "–")
        self.assertEqual(_recall(m), "0.60 [0.50, 0.70]")

    def test_a_fold_of_few_incidents_or_little_normal_time_is_cautioned(self):
        from lodo import _cautions
        rows = [row("model", 0.0, [0.0, 0.0], events=6), row("static robust z", 1.0, [1.0, 1.0], events=6)]
        (line, blank) = _cautions(rows, ["nab"])
        self.assertIn("nab: 6 test incident(s)", line)
        self.assertEqual(blank, "")
        base = row("static robust z", 0.2, [0.1, 0.3])
        self.assertEqual(_cautions([row("model", 0.3, [0.2, 0.4]), base], ["nab"]), [])
        short = [dict(row("model", 0.3, [0.2, 0.4]), test_days=0.25), base]
        self.assertIn("0.25 days of normal test data", _cautions(short, ["nab"])[0])


class Default(unittest.TestCase):
    def test_a_default_that_armed_on_no_series_says_so(self):
        from lodo import _default_row
        r = dict(row(evaluate.AS_DEFAULT, 0.0, [0.0, 0.0], budget=None), recall_any=0.0,
                 normal_time_alarmed=0.0, chance_early=0.0, series=20, unarmed=20)
        self.assertEqual(_default_row("nezha", r), "| nezha | never armed on its 20 series | – | – | – | – |")
        r.update(unarmed=19)
        self.assertTrue(_default_row("nezha", r).startswith("| nezha | 0.00 [0.00, 0.00] | 0.00 | 0.50 | 0.00 % |"))
        del r["series"], r["unarmed"]  # a run from before the count
        self.assertTrue(_default_row("nezha", r).startswith("| nezha | 0.00 [0.00, 0.00] |"))
        # a run with no default row (scored without the model, or under an older name)
        self.assertEqual(_default_row("nezha", None), "| nezha | – | – | – | – | – |")


class SameRule(unittest.TestCase):
    def test_the_default_is_set_beside_the_classical_detector_best_under_its_rule(self):
        from lodo import _same_rule
        cal = evaluate.calibrated_name
        rows = [
            row("model", 0.30, [0.2, 0.4]),
            dict(row(evaluate.AS_DEFAULT, 0.2, [0.1, 0.3], budget=None, trips=0.7), series=3, unarmed=0),
            row("static robust z", 0.25, [0.1, 0.4]),  # by the protocol: not under the default's rule
            dict(row(cal("static robust z"), 0.1, [0.0, 0.2], k=2, budget=None), calibrated_of="static robust z"),
            dict(row(cal("rolling robust z"), 0.1, [0.0, 0.3], k=2, budget=None, trips=0.2),
                 calibrated_of="rolling robust z"),
            dict(row(cal("calibrated rule"), 0.4, [0.3, 0.5], k=2, budget=None, H=12),  # another horizon
                 calibrated_of="calibrated rule"),
        ]
        h = headline(rows, "nab", 1.0)
        # the most early warnings; of those level, the fewest false trips
        self.assertEqual(h["calibrated"]["calibrated_of"], "rolling robust z")
        self.assertEqual(h["best"]["detector"], "static robust z")  # the protocol's comparison is as it was
        self.assertEqual(_same_rule(rows, ["nab"])[2],
                         "| nab (H = 6) | 0.20 [0.10, 0.30] | 0.70 | rolling robust z | 0.10 [0.00, 0.30] | "
                         "0.20 | 2.00x |")
        # where neither armed, no ratio; runs from before the rows were made have none
        for r in rows[1], rows[4]:
            r.update(series=3, unarmed=3)
        self.assertEqual(_same_rule(rows, ["nab"])[2],
                         "| nab (H = 6) | never armed | – | rolling robust z | never armed | – | – |")
        self.assertIsNone(headline(rows[:3], "nab", 1.0)["calibrated"])


class Overlap(unittest.TestCase):
    def test_the_incidents_each_warns_of_are_counted_together_and_apart(self):
        from lodo import _overlap, overlap, seeds_overlap

        def r(detector, early, **kw):
            return dict(row(detector, len(early) / 10, [0.0, 0.5], **kw), events=10, early=len(early),
                        early_events=early)

        rows = [
            r("model", [0, 3, 7]),
            r("NAB contextOSE", [1, 3, 5, 8]),  # the best baseline
            r("static robust z", [2, 3]),
            r("rolling robust z", [5], budget=0.1),  # another budget: not counted
            r("calibrated rule", [4, 6, 9], H=12),  # another horizon: not counted
            r(evaluate.AS_DEPLOYED, [6]),  # the seed's operating point is no classical detector
            r(ANCHOR, [9]),  # nor is the anchor
        ]
        o = overlap(rows, "nab")
        self.assertEqual((o["best"], o["model"], o["baseline"], o["both"], o["model_alone"],
                          o["baseline_alone"], o["classical"], o["detectors"], o["any"]),
                         ("NAB contextOSE", 3, 4, 1, 2, 3, 5, 2, 7))
        self.assertEqual(_overlap(rows, ["nab"])[2],
                         "| nab (H = 6) | 10 | 3 | NAB contextOSE | 4 | 1 | 2 | 3 | 5 (2 detectors) | 7 |")
        # two seeds side by side, and pooled
        other = [r("model", [3, 5]), r("NAB contextOSE", [3, 5, 8]), r("static robust z", [])]
        runs = {7: rows, 8: other}
        self.assertEqual(seeds_overlap(runs, ["nab"])[2],
                         "| nab (H = 6) | 3, 2 | 4, 3 | 1, 2 | 5, 3 | 7, 3 |")
        self.assertIn("the model warns early of 2 incidents the best baseline of its run does not, "
                      "and the best baseline of 4 the model does not; both of 3.",
                      seeds_report(runs, ["nab"]))
        # rows of runs that do not say which incidents: no section
        del rows[2]["early_events"]
        self.assertIsNone(overlap(rows, "nab"))
        self.assertEqual(seeds_overlap(runs, ["nab"]), [])
        self.assertNotIn("Which incidents", seeds_report(runs, ["nab"]))


class BeyondChance(unittest.TestCase):
    def test_an_alarm_on_a_fifth_of_the_time_earns_nothing_for_the_warnings_it_gets_by_chance(self):
        # Hour steps, H = 6: alarmed 20 % of normal time and 1 false trip a day, early recall
        # 0.25: chance alone is about 0.29, so nothing beyond it. A detector that trips once
        # in ten days, never otherwise alarmed, with the same recall: nearly all of it counts.
        noisy = dict(recall_early=0.25, normal_time_alarmed=0.2, false_trips_per_day=1.0,
                     H=6, step_seconds=3600.0)
        quiet = dict(noisy, normal_time_alarmed=0.0, false_trips_per_day=0.1)
        self.assertLess(beyond_chance(noisy), 0.0)
        self.assertAlmostEqual(beyond_chance(quiet), 0.25, delta=0.02)
        self.assertEqual(beyond_chance(dict(noisy, recall_early=1.0)), 1.0)


class RankingCheck(unittest.TestCase):
    def test_a_threshold_from_the_test_part_keeps_its_budget_there_where_validations_does_not(self):
        import numpy as np

        from traces import Trace
        # Hour steps: validation and test 500 steps (20.8 days) each. The detector's scores
        # drift: uniform on [0, 1] in validation; in test also a spike of 1.5 every 10 steps
        # (2.4 a day), and scores of 3 before an incident at 1,800.
        rng = np.random.default_rng(1)
        sc = rng.random(2000)
        sc[1500::10] = 1.5
        sc[1794:1800] = 3.0
        tr = Trace("t", "drift", np.zeros((2000, 8), np.float32), [(1800, 1805)], 3600.0,
                   val_from=1000, test_from=1500)
        check = evaluate.ranking_check_rows("drift", [tr], {"model": [sc], "flat": [np.zeros(2000)]})
        h = headline(check, "drift", 1.0, ranking_check=True)
        self.assertIsNone(h["default"])
        self.assertEqual(h["model"]["threshold_from"], evaluate.RANKING_CHECK)
        self.assertEqual(h["best"]["detector"], "flat")
        # validation's threshold trips far over the budget on the test part; the check's keeps it
        from_val = evaluate.choose_threshold([tr], [sc], h["H"], 1.0)
        self.assertGreater(evaluate.run_part([tr], [sc], "test", from_val, h["H"]).false_trips_per_day(), 1.0)
        self.assertLessEqual(h["model"]["false_trips_per_day"], 1.0)
        self.assertEqual(h["model"]["early"], 1)
        self.assertGreater(h["model"]["threshold"], from_val)
        # evaluate.py's tables show the protocol's rows only
        self.assertEqual(evaluate.table(check, "drift", h["H"], 1, 1.0), "")


def seed_rows(model, best, default, check_model, check_best, events=17, other=1):
    """One run's rows for NAB at its headline horizon: the model, two baselines (the best
    warning of `best`, the other of `other`), the default, and the ranking check's model and
    baseline."""
    def r(detector, early, budget=1.0, source=None, trips=0.5):
        return dict(row(detector, early / events, [0.0, 1.0], budget=budget, trips=trips),
                    early=early, events=events, threshold_from=source, normal_time_alarmed=0.001)
    return [r("model", model), r("NAB contextOSE", best), r("static robust z", other),
            r(evaluate.AS_DEFAULT, default, budget=None, trips=0.8),
            r("model", check_model, source=evaluate.RANKING_CHECK),
            r("NAB contextOSE", check_best, source=evaluate.RANKING_CHECK)]


class Seeds(unittest.TestCase):
    def test_the_seeds_side_by_side_count_each_runs_warnings_against_its_own_best_baseline(self):
        runs = {7: seed_rows(2, 4, 2, 2, 4), 8: seed_rows(3, 4, 1, 2, 4), 9: seed_rows(4, 4, 2, 3, 4)}
        table = seeds_table(runs, ["nab"])
        self.assertEqual(len(table), 4)  # header, rule, one fold, blank
        cells = [c.strip() for c in table[2].strip("|").split("|")]
        self.assertEqual(cells, ["nab (H = 6)", "17", "2, 3, 4", "0.50", "NAB contextOSE", "4, 4, 4",
                                 "1 of 3", "0.75x", "2, 2, 3", "4, 4, 4", "2, 1, 2", "0.80"])
        # Pooled, not the median of each seed's ratio: 3 and 2 against 1 and 15 is 0.31x
        # (the median of 3.00x and 0.13x read 1.57x).
        two = {7: seed_rows(3, 1, 2, 2, 4), 8: seed_rows(2, 15, 1, 2, 4)}
        self.assertEqual([c.strip() for c in seeds_table(two, ["nab"])[2].strip("|").split("|")][7], "0.31x")
        self.assertEqual(pooled(runs, ["nab"], "model"), (9, 51))
        self.assertEqual(pooled(runs, ["nab"], "default"), (5, 51))
        text = seeds_report(runs, ["nab"], "out", ["x.csv: no traffic in any step, skipped"])
        self.assertIn("seeds 7, 8, 9", text)
        self.assertIn("- x.csv: no traffic in any step, skipped", text)
        self.assertIn("the model, thresholds from validation: 9 early warnings of 51 incidents (17.6 %)", text)
        self.assertIn("`out/seed-7/lodo.md`", text)

    def test_baselines_that_warned_of_nothing_count_ahead_and_a_missing_row_shows_a_dash(self):
        runs = {1: seed_rows(1, 0, 1, 1, 0, other=0), 2: seed_rows(1, 0, 0, 1, 0, other=0),
                3: seed_rows(0, 2, 1, 0, 2)}
        # seed 3 scored without the ranking check or the default (an older run's rows)
        runs[3] = [r for r in runs[3] if r["threshold_from"] is None and r["detector"] != evaluate.AS_DEFAULT]
        cells = [c.strip() for c in seeds_table(runs, ["nab"])[2].strip("|").split("|")]
        self.assertEqual(cells[2], "1, 1, 0")
        self.assertEqual(cells[5], "0, 0, 2")
        self.assertEqual(cells[6], "2 of 3")
        self.assertEqual(cells[7], "1.00x")  # pooled: 2 against 2
        self.assertEqual(cells[8:11], ["1, 1, –", "0, 0, –", "1, 0, –"])
        self.assertEqual(pooled(runs, ["nab"], "default"), (1, 34))
        # one seed ahead (the baseline none), one at half the baseline: 2 against 2, pooled;
        # ahead where the baselines warned of none with every seed
        two = {1: runs[1], 2: seed_rows(1, 2, 1, 1, 2)}
        self.assertEqual([c.strip() for c in seeds_table(two, ["nab"])[2].strip("|").split("|")][7], "1.00x")
        ahead = {1: runs[1], 2: runs[2]}
        self.assertEqual([c.strip() for c in seeds_table(ahead, ["nab"])[2].strip("|").split("|")][7], "ahead")

    def test_a_seeds_folds_run_apart_merge_into_one_run(self):
        with tempfile.TemporaryDirectory() as root:
            paths = []
            for d, note in (("nab", "a"), ("smd", "a"), ("nezha", "b")):
                paths.append(os.path.join(root, f"{d}.json"))
                with open(paths[-1], "w") as f:
                    json.dump(dict(rows=[dict(dataset=d)], models={d: {"seconds": 1}}, notes=[note]), f)
            run = merge(paths)
        self.assertEqual([r["dataset"] for r in run["rows"]], ["nab", "smd", "nezha"])
        self.assertEqual(list(run["models"]), ["nab", "smd", "nezha"])
        self.assertEqual(run["notes"], ["a", "b"])

    def test_a_fold_run_apart_has_the_same_recipe_and_its_own_seed_and_threads(self):
        a = types.SimpleNamespace(data="pub", epochs=8, hard_negatives=20000, arch="zsl", balance=False,
                                  traces=["mine", "theirs"], reuse=True)
        argv = child_argv(a, 9, "nab", 2, "out/seed-9")
        self.assertEqual(argv[:2], [sys.executable, LODO])
        flags = argv[2:]
        for flag, value in (("--data", "pub"), ("--out-dir", "out/seed-9"), ("--folds", "nab"),
                            ("--seed", "9"), ("--arch", "zsl"), ("--threads", "2"),
                            ("--json", os.path.join("out/seed-9", "fold-nab.json"))):
            self.assertEqual(flags[flags.index(flag) + 1], value)
        self.assertIn("--no-balance", flags)
        self.assertIn("--reuse", flags)
        self.assertEqual([flags[i + 1] for i, f in enumerate(flags) if f == "--traces"], ["mine", "theirs"])

    def test_every_run_goes_to_its_log_and_the_failed_ones_are_named(self):
        with tempfile.TemporaryDirectory() as root:
            jobs = [([sys.executable, "-c", f"import os, sys; print(os.environ['OMP_NUM_THREADS'], {i}); "
                      f"sys.exit({3 if i == 1 else 0})"], os.path.join(root, f"{i}.log")) for i in range(3)]
            said = []
            failed = run_all(jobs, 2, 4, log=lambda m, **_: said.append(m))
            self.assertEqual(failed, [(os.path.join(root, "1.log"), 3)])
            for i in range(3):
                with open(os.path.join(root, f"{i}.log")) as f:
                    self.assertEqual(f.read(), f"4 {i}\n")
            self.assertEqual(len(said), 3)

    def test_a_seed_given_twice_or_with_seed_is_refused(self):
        for extra in (["--seeds", "7", "7"], ["--seed", "7", "--seeds", "8"]):
            p = subprocess.run([sys.executable, LODO, "--data", "nowhere", "--out-dir", "nowhere", *extra],
                               capture_output=True, text=True)
            self.assertEqual(p.returncode, 2)
            self.assertRegex(p.stderr, "given twice|not allowed with")


if __name__ == "__main__":
    unittest.main()
