//! [`Recorder`]: dumps every tick's features per class to CSV, the format the evaluation
//! harness reads, so traces of a running service under fault injection can be evaluated and
//! trained on.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tower_degrade::BoxError;
use tower_degrade::predict::{FEATURES, N_FEATURES, Predictor, WINDOW};

use crate::Error;

/// Marks the ticks during which a fault is injected into one class: the `fault` column of its
/// CSV. Clone it into whatever injects the fault.
///
/// The column documents the experiment; the harness does not use it as the label. What a
/// predictor must foresee is the SLO breach, which the harness finds in the features (an
/// injected fault may never breach, or breach long after it starts).
#[derive(Debug, Clone, Default)]
pub struct Fault(Arc<AtomicBool>);

impl Fault {
    /// From the next tick on, rows are marked `on`.
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }

    /// Whether the fault is marked.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A [`Predictor`] that writes each tick's newest features per class to `<dir>/<class>.csv`,
/// optionally wrapping the predictor that really decides (its probability is recorded too).
/// In file names, a class name's characters other than ASCII letters, digits, `-` and `_`
/// become `_`; two classes that would share a file (`pay.ment`, `pay_ment`) are refused at
/// warm-up, naming both.
///
/// Columns: `time_s`, the eight [`FEATURES`], `p_anomaly`, `fault`. The evaluation harness
/// (`tower-degrade-ai/training/evaluate.py --traces DIR`) reads a directory of such files.
///
/// A row is written for each batch the runtime gives the predictor, `time_s` a tick after the
/// row before: while the wrapped predictor runs past its budget the runtime gives it none,
/// and those ticks are missing from the file with nothing in `time_s` to show it. Wrap a
/// predictor that keeps within its budget (the bundled model, [`ScanPredictor`](crate::ScanPredictor)),
/// or none (`p_anomaly` 0), and watch `degrade_predictor_overruns_total` while recording. A
/// tick the wrapped predictor fails on is recorded, with `p_anomaly` NaN.
///
/// A file already there (the process restarted) is continued, not replaced: its header must
/// be these columns (else warm-up fails naming it: move it aside), a last row cut off by a
/// crash is dropped, and `time_s` goes on one tick after its last row (the time the process
/// was down is not in the file).
///
/// ```no_run
/// use std::time::Duration;
/// use tower_degrade::{ClassConfig, Degrader, predict::PredictorConfig};
/// use tower_degrade_ai::Recorder;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut recorder = Recorder::new("traces/run-1", Duration::from_millis(500))?;
/// let fault = recorder.fault("payment");
/// let degrader = Degrader::builder("shop")
///     .class(ClassConfig::gold("payment"))
///     .predictor(recorder, PredictorConfig::default())
///     .build()?;
/// fault.set(true); // while a fault is injected into `payment`
/// # Ok(()) }
/// ```
pub struct Recorder {
    dir: PathBuf,
    tick: Duration,
    faults: Vec<(String, Fault)>,
    inner: Option<Box<dyn Predictor>>,
    files: Vec<Recording>,
    step: u64,
    /// A write failed and has been logged; cleared (and said) when one succeeds again.
    failing: bool,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("dir", &self.dir)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Records into `dir` (created if missing); `tick` is the control loop's interval, for
    /// the `time_s` column: the degrader's (`DegraderBuilder::tick`), or building the degrader
    /// fails saying both.
    pub fn new(dir: impl Into<PathBuf>, tick: Duration) -> Result<Self, Error> {
        let dir = dir.into();
        if dir.as_os_str().is_empty() {
            // Else the working directory, which nobody named.
            return Err(Error::Io {
                path: dir,
                reason: "an empty path: name the directory to record into (`.` for the \
                         working directory)"
                    .to_owned(),
            });
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
            path: dir.clone(),
            reason: if dir.exists() && !dir.is_dir() {
                "not a directory: name the directory to record into (one file per class is \
                 written in it)"
                    .to_owned()
            } else {
                e.to_string()
            },
        })?;
        Ok(Self {
            dir,
            tick,
            faults: Vec::new(),
            inner: None,
            files: Vec::new(),
            step: 0,
            failing: false,
        })
    }

    /// Also run `inner`, whose probabilities reach the breaker and the `p_anomaly` column. A
    /// tick the recording cannot be written (a full disk) still answers `inner`'s
    /// probabilities: the failure is logged once, and again when writing resumes.
    pub fn wrap(mut self, inner: impl Predictor) -> Self {
        self.inner = Some(Box::new(inner));
        self
    }

    /// The handle that marks faults injected into `class` (the `fault` column of its file).
    pub fn fault(&mut self, class: &str) -> Fault {
        if let Some((_, f)) = self.faults.iter().find(|(c, _)| c == class) {
            return f.clone();
        }
        let f = Fault::default();
        self.faults.push((class.to_owned(), f.clone()));
        f
    }

    fn write_rows(&mut self, input: &[f32], out: &[f32]) -> Result<(), Error> {
        // Counted whether or not the rows are written: after a failed tick, `time_s` is
        // still the tick's own.
        let since = self.tick.as_secs_f64() * self.step as f64;
        self.step += 1;
        // Each class's window and answer, in the order of the files (a batch of other length
        // than the classes it was made for writes the classes both have, not a panic).
        let classes = input.chunks_exact(WINDOW * N_FEATURES).zip(out);
        for (rec, (window, p)) in self.files.iter_mut().zip(classes) {
            let Recording {
                path,
                file,
                fault,
                start,
            } = rec;
            let time = *start + since;
            let fault = u8::from(fault.as_ref().is_some_and(Fault::get));
            let io = |e: std::io::Error| Error::Io {
                path: path.clone(),
                reason: e.to_string(),
            };
            write!(file, "{time:.3}").map_err(io)?;
            for v in &window[(WINDOW - 1) * N_FEATURES..] {
                write!(file, ",{v}").map_err(io)?;
            }
            writeln!(file, ",{p},{fault}").map_err(io)?;
            file.flush().map_err(io)?;
        }
        Ok(())
    }
}

/// A class name as a file name: anything but ASCII letters, digits, `-` and `_` becomes `_`.
fn file_name(class: &str) -> String {
    class
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// One class's file.
struct Recording {
    path: PathBuf,
    file: BufWriter<File>,
    fault: Option<Fault>,
    /// `time_s` of the first row this process writes.
    start: f64,
}

fn header() -> String {
    format!("time_s,{},p_anomaly,fault", FEATURES.join(","))
}

/// The class's file, opened to append: a new one gets the header; one already there is
/// checked, its cut-off last row dropped, and its rows continued a tick after its last.
fn open(dir: &Path, class: &str, tick: Duration) -> Result<Recording, Error> {
    let path = dir.join(format!("{}.csv", file_name(class)));
    let io = |e: std::io::Error| Error::Io {
        path: path.clone(),
        reason: e.to_string(),
    };
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(&path)
        .map_err(io)?;
    let mut len = file.metadata().map_err(io)?.len();
    let mut start = 0.0;
    let refuse = |reason: String| {
        Err(Error::Io {
            path: path.clone(),
            reason,
        })
    };
    if len > 0 {
        // Nothing is changed until the file is known to be a recording to go on with.
        let head = format!("{}\n", header());
        let mut first = Vec::new();
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        (&mut file)
            .take(head.len() as u64)
            .read_to_end(&mut first)
            .map_err(io)?;
        if len < head.len() as u64 && head.as_bytes().starts_with(&first) {
            // A crash while the header was written: an empty recording.
            file.set_len(0).map_err(io)?;
            len = 0;
        } else if first != head.as_bytes() {
            // What is there: its first line, at most 512 bytes more than the header's.
            let mut line = Vec::new();
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            (&mut file)
                .take(head.len() as u64 + 512)
                .read_to_end(&mut line)
                .map_err(io)?;
            let found = String::from_utf8_lossy(&line);
            let found = found.split('\n').next().unwrap_or_default();
            let split = if found.split(',').any(|c| c == "split") {
                " (a `split` column: the training tools' `traces.py split` wrote it)"
            } else {
                ""
            };
            return refuse(format!(
                "it is there and not a recording of these columns (expected the header `{}`, \
                 found `{}`{split}): move it aside, or record into another directory",
                header(),
                found.escape_debug()
            ));
        } else {
            // The header ends in a newline, so there is a last one: the end of the last whole
            // row (or of the header); what follows it is a row a crash cut off.
            let end = last_newline(&mut file, len).map_err(io)?.unwrap_or(0);
            if end >= head.len() as u64 {
                let from = last_newline(&mut file, end)
                    .map_err(io)?
                    .map_or(0, |i| i + 1);
                let mut row = Vec::new();
                file.seek(SeekFrom::Start(from)).map_err(io)?;
                (&mut file)
                    .take((end - from).min(64 * 1024))
                    .read_to_end(&mut row)
                    .map_err(io)?;
                let time = std::str::from_utf8(&row)
                    .ok()
                    .and_then(|l| l.split(',').next())
                    .and_then(|t| t.parse::<f64>().ok())
                    .filter(|t| t.is_finite());
                let Some(time) = time else {
                    return refuse(
                        "its last row has no time_s to go on from: move it aside".to_owned(),
                    );
                };
                start = time + tick.as_secs_f64();
            }
            if end + 1 < len {
                file.set_len(end + 1).map_err(io)?;
            }
        }
    }
    let mut file = BufWriter::new(file);
    if len == 0 {
        writeln!(file, "{}", header()).map_err(io)?;
    }
    Ok(Recording {
        path,
        file,
        fault: None,
        start,
    })
}

/// The offset of the last `\n` in `file` before `end`, read backwards 64 KiB at a time.
fn last_newline(file: &mut File, end: u64) -> std::io::Result<Option<u64>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut hi = end;
    while hi > 0 {
        let lo = hi.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(hi - lo) as usize];
        file.seek(SeekFrom::Start(lo))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

impl Predictor for Recorder {
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        // A tick the wrapped predictor fails on is recorded too (p_anomaly NaN), so that
        // time_s stays the tick's own; the failure is passed on after.
        let answer = match &mut self.inner {
            Some(inner) => inner.predict(input, out),
            None => {
                out.fill(0.0);
                Ok(())
            }
        };
        if answer.is_err() {
            out.fill(f32::NAN);
        }
        // The recording serves the predictor, not the other way round: a trace that cannot
        // be written does not take early warning away.
        match self.write_rows(input, out) {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!(dir = %self.dir.display(), "recording resumed");
            }
            Ok(()) => {}
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(error = %e,
                    "a tick's features cannot be recorded; predictions go on (said once until a \
                     write succeeds)");
            }
            Err(_) => {}
        }
        answer
    }

    /// Refuses a tick other than the one the recorder was made for: `time_s` counts its tick,
    /// and the harness reads a trace by its step (its horizons, grace and rates per day), so
    /// a recording made at a 1 s tick written 500 ms apart would be scored at half its time.
    fn tick_interval(&mut self, tick: Duration) -> Result<(), BoxError> {
        if tick != self.tick {
            return Err(format!(
                "recorder into {}: made for a {:?} tick, but the degrader ticks every {:?}: \
                 its time_s would be off; make it with the degrader's tick",
                self.dir.display(),
                self.tick,
                tick
            )
            .into());
        }
        match &mut self.inner {
            Some(inner) => inner.tick_interval(tick),
            None => Ok(()),
        }
    }

    fn warm_up(&mut self, classes: &[&str]) -> Result<(), BoxError> {
        // `file_name` is not one-to-one (`a.b`, `a:b` and `a_b` are all `a_b`): two classes
        // in one file would interleave their rows.
        for (i, a) in classes.iter().enumerate() {
            if let Some(b) = classes[..i].iter().find(|b| file_name(b) == file_name(a)) {
                return Err(Error::Io {
                    path: self.dir.join(format!("{}.csv", file_name(a))),
                    reason: format!(
                        "classes `{b}` and `{a}` would both be recorded in this file: rename one"
                    ),
                }
                .into());
            }
        }
        self.files = classes
            .iter()
            .map(|c| open(&self.dir, c, self.tick))
            .collect::<Result<_, _>>()?;
        for (class, rec) in classes.iter().zip(&mut self.files) {
            rec.fault = self
                .faults
                .iter()
                .find(|(c, _)| c == class)
                .map(|(_, f)| f.clone());
        }
        if let Some(inner) = &mut self.inner {
            inner.warm_up(classes)?;
        }
        Ok(())
    }

    /// The wrapped predictor's: recording does not make a hanging model unstoppable.
    fn stop_handle(&mut self) -> Option<tower_degrade::predict::StopHandle> {
        self.inner.as_mut()?.stop_handle()
    }

    /// The wrapped predictor's.
    fn name(&self) -> Option<String> {
        self.inner.as_ref()?.name()
    }

    fn fingerprint(&self) -> Option<String> {
        self.inner.as_ref()?.fingerprint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers 0.25 for every class.
    struct Quarter;

    impl Predictor for Quarter {
        fn predict(&mut self, _input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
            out.fill(0.25);
            Ok(())
        }
    }

    /// Fails every other batch, the first one fine.
    struct EveryOther(u32);

    impl Predictor for EveryOther {
        fn predict(&mut self, _input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
            self.0 += 1;
            if self.0.is_multiple_of(2) {
                return Err("the model failed".into());
            }
            out.fill(0.5);
            Ok(())
        }

        fn warm_up(&mut self, _classes: &[&str]) -> Result<(), BoxError> {
            Ok(())
        }
    }

    #[test]
    fn a_tick_other_than_the_recorders_is_refused_and_its_own_passed_on() {
        // It was taken silently: a 1 s degrader's ticks were written 500 ms apart.
        struct Told(std::sync::Arc<std::sync::Mutex<Option<Duration>>>);
        impl Predictor for Told {
            fn predict(&mut self, _: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
                out.fill(0.0);
                Ok(())
            }
            fn tick_interval(&mut self, tick: Duration) -> Result<(), BoxError> {
                *self.0.lock().unwrap() = Some(tick);
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let told = std::sync::Arc::default();
        let mut rec = Recorder::new(dir.path(), Duration::from_millis(500))
            .unwrap()
            .wrap(Told(std::sync::Arc::clone(&told)));
        let err = rec.tick_interval(Duration::from_secs(1)).unwrap_err();
        assert!(
            err.to_string()
                .contains("made for a 500ms tick, but the degrader ticks every 1s"),
            "{err}"
        );
        assert_eq!(*told.lock().unwrap(), None);
        rec.tick_interval(Duration::from_millis(500)).unwrap();
        assert_eq!(*told.lock().unwrap(), Some(Duration::from_millis(500)));
    }

    #[test]
    fn a_tick_the_wrapped_predictor_fails_on_is_recorded_and_the_failure_passed_on() {
        // It was neither recorded nor counted: time_s ran on as if it had not been.
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::new(dir.path(), Duration::from_millis(500))
            .unwrap()
            .wrap(EveryOther(0));
        rec.warm_up(&["a"]).unwrap();
        let input = vec![0.0f32; WINDOW * N_FEATURES];
        let mut out = [0.0];
        rec.predict(&input, &mut out).unwrap();
        let err = rec.predict(&input, &mut out).unwrap_err();
        assert_eq!(err.to_string(), "the model failed");
        rec.predict(&input, &mut out).unwrap();
        let a = std::fs::read_to_string(dir.path().join("a.csv")).unwrap();
        let rows: Vec<&str> = a.lines().skip(1).collect();
        assert_eq!(
            rows,
            [
                "0.000,0,0,0,0,0,0,0,0,0.5,0",
                "0.500,0,0,0,0,0,0,0,0,NaN,0",
                "1.000,0,0,0,0,0,0,0,0,0.5,0"
            ]
        );
    }

    #[test]
    fn writes_each_ticks_newest_features_per_class_with_the_fault_mark() {
        let dir = std::env::temp_dir().join(format!("tdai-rec-{}", std::process::id()));
        let mut rec = Recorder::new(&dir, Duration::from_millis(500)).unwrap();
        let fault = rec.fault("b");
        let mut rec = rec.wrap(Quarter);
        rec.warm_up(&["a", "b"]).unwrap();
        let mut input = vec![0.0f32; 2 * WINDOW * N_FEATURES];
        let newest = |class: usize| (class * WINDOW + WINDOW - 1) * N_FEATURES;
        for f in 0..N_FEATURES {
            input[newest(0) + f] = f as f32;
            input[newest(1) + f] = 10.0 + f as f32;
        }
        // an older tick's values must not be written
        input[newest(0) - 1] = 99.0;
        let mut out = [0.0; 2];
        rec.predict(&input, &mut out).unwrap();
        fault.set(true);
        rec.predict(&input, &mut out).unwrap();
        assert_eq!(out, [0.25, 0.25]);

        let a = std::fs::read_to_string(dir.join("a.csv")).unwrap();
        let b = std::fs::read_to_string(dir.join("b.csv")).unwrap();
        let header = format!("time_s,{},p_anomaly,fault", FEATURES.join(","));
        assert_eq!(
            a.lines().collect::<Vec<_>>(),
            [
                header.as_str(),
                "0.000,0,1,2,3,4,5,6,7,0.25,0",
                "0.500,0,1,2,3,4,5,6,7,0.25,0"
            ]
        );
        assert_eq!(
            b.lines().skip(1).collect::<Vec<_>>(),
            [
                "0.000,10,11,12,13,14,15,16,17,0.25,0",
                "0.500,10,11,12,13,14,15,16,17,0.25,1"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_batch_of_fewer_classes_than_the_warm_up_writes_those_it_has() {
        // It indexed the batch by the warm-up's classes: called with fewer, it panicked.
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::new(dir.path(), Duration::from_millis(500))
            .unwrap()
            .wrap(Quarter);
        rec.warm_up(&["a", "b"]).unwrap();
        let mut out = [0.0; 1];
        rec.predict(&vec![0.0f32; WINDOW * N_FEATURES], &mut out)
            .unwrap();
        assert_eq!(out, [0.25]);
        let a = std::fs::read_to_string(dir.path().join("a.csv")).unwrap();
        let b = std::fs::read_to_string(dir.path().join("b.csv")).unwrap_or_default();
        assert_eq!(
            a.lines().skip(1).collect::<Vec<_>>(),
            ["0.000,0,0,0,0,0,0,0,0,0.25,0"]
        );
        assert_eq!(b.lines().skip(1).count(), 0, "no row: {b}");
    }

    #[test]
    fn a_restarted_recorder_continues_its_files_and_drops_a_row_cut_off() {
        // It replaced them: a restart during a days-long recording lost the hours before.
        let dir = std::env::temp_dir().join(format!("tdai-restart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let input = vec![0.5f32; WINDOW * N_FEATURES];
        let record = |ticks: usize| {
            let mut out = [0.0; 1];
            let mut rec = Recorder::new(&dir, Duration::from_millis(500))
                .unwrap()
                .wrap(Quarter);
            rec.warm_up(&["a"]).unwrap();
            for _ in 0..ticks {
                rec.predict(&input, &mut out).unwrap();
            }
        };
        record(2);
        // A crash in the middle of a row.
        let path = dir.join("a.csv");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"1.000,0.5,0.").unwrap();
        drop(f);
        record(2);
        let text = std::fs::read_to_string(&path).unwrap();
        let times: Vec<&str> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap())
            .collect();
        assert_eq!(times, ["0.000", "0.500", "1.000", "1.500"], "{text}");
        assert_eq!(text.lines().next().unwrap(), header());
        assert!(
            text.lines().skip(1).all(|l| l.split(',').count() == 11),
            "{text}"
        );

        // A power loss that left 70 KiB of NULs after the last row: dropped, and no more.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&vec![0u8; 70 * 1024]).unwrap();
        drop(f);
        record(1);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(text.ends_with('\n') && text.lines().last().unwrap().starts_with("2.000,"));
        // A crash while the header was written: an empty recording, started again.
        std::fs::write(&path, &header().as_bytes()[..20]).unwrap();
        record(1);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().collect::<Vec<_>>()[0], header());
        assert!(text.lines().nth(1).unwrap().starts_with("0.000,"), "{text}");

        // Not a recording of these columns: refused, and left as it was.
        std::fs::write(&path, "time_s,p99\n0,1\n").unwrap();
        let mut rec = Recorder::new(&dir, Duration::from_millis(500)).unwrap();
        let err = rec.warm_up(&["a"]).unwrap_err().to_string();
        assert!(
            err.contains("a.csv")
                && err.contains("found `time_s,p99`")
                && err.contains("move it aside"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "time_s,p99\n0,1\n");
        // One the training tools split: said so.
        let split = format!("{},split\n", header());
        std::fs::write(&path, &split).unwrap();
        let mut rec = Recorder::new(&dir, Duration::from_millis(500)).unwrap();
        let err = rec.warm_up(&["a"]).unwrap_err().to_string();
        assert!(err.contains("`traces.py split` wrote it"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_it() {
        let file = std::env::temp_dir().join(format!("tdai-file-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        let err = Recorder::new(file.join("sub"), Duration::from_millis(500)).unwrap_err();
        assert!(
            matches!(&err, Error::Io { path, .. } if path == &file.join("sub")),
            "{err}"
        );
        // The file itself: said to be one, not "File exists".
        let err = Recorder::new(&file, Duration::from_millis(500)).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        std::fs::remove_file(&file).unwrap();
        let err = Recorder::new("", Duration::from_millis(500)).unwrap_err();
        assert!(err.to_string().contains("an empty path"), "{err}");
    }

    #[test]
    fn two_classes_of_one_file_name_are_refused_naming_both() {
        let dir = std::env::temp_dir().join(format!("tdai-rec-same-{}", std::process::id()));
        let mut rec = Recorder::new(&dir, Duration::from_millis(500)).unwrap();
        let err = rec.warm_up(&["pay.ment", "stock", "pay_ment"]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("pay_ment.csv") && text.contains("`pay.ment` and `pay_ment`"),
            "{text}"
        );
        rec.warm_up(&["pay.ment", "stock"]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_tick_that_cannot_be_recorded_still_answers_the_wrapped_predictor() {
        let dir = std::env::temp_dir().join(format!("tdai-rec-full-{}", std::process::id()));
        let mut rec = Recorder::new(&dir, Duration::from_millis(500))
            .unwrap()
            .wrap(Quarter);
        // Every write to the class's file fails: a full disk.
        std::os::unix::fs::symlink("/dev/full", dir.join("a.csv")).unwrap();
        // The header is buffered; the first row's flush fails.
        rec.warm_up(&["b", "a"]).unwrap();
        let input = vec![0.0f32; 2 * WINDOW * N_FEATURES];
        for _ in 0..3 {
            let mut out = [0.0; 2];
            rec.predict(&input, &mut out).unwrap();
            assert_eq!(out, [0.25, 0.25]);
        }
        assert!(rec.failing);
        // The class whose file can be written keeps each tick's own time.
        let b = std::fs::read_to_string(dir.join("b.csv")).unwrap();
        let times: Vec<&str> = b.lines().skip(1).map(|l| &l[..5]).collect();
        assert_eq!(times, ["0.000", "0.500", "1.000"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn class_names_become_safe_file_names() {
        assert_eq!(file_name("pay/ment v2"), "pay_ment_v2");
        assert_eq!(file_name("../etc"), "___etc");
    }
}
