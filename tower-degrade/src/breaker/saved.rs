//! What the classes' calibrations learnt, saved so that the next process starts from it.
//!
//! A calibrated prediction threshold learns from a class's healthy ticks
//! ([`PredictThreshold::Calibrated`](super::PredictThreshold)): its warm-up is 3,600 of them
//! by default (half an hour at the 500 ms tick), during which the predictor only reports. A
//! process that starts again (a deploy, a pod the autoscaler adds during a peak) would spend
//! that half hour without early warnings. [`Degrader::calibrations`](crate::Degrader::calibrations)
//! takes what every class has learnt, [`Calibrations::save`] writes it, and
//! [`DegraderBuilder::restore_calibrations`](crate::DegraderBuilder::restore_calibrations)
//! starts the next process's classes from it.
//!
//! The file is a small binary record (a header, then per class its warm-up scores, 8 bytes
//! each, as many as the warm-up: 28 KiB by default; or its fitted tail: at most 2,048
//! excesses, 16 KiB), checked with a CRC-32 (`crc32fast`), written
//! to a temporary file beside the target, synced, then renamed over it: a crash while saving
//! leaves the old file or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::calibrate::{Fitted, Learnt};
use crate::error::escape_cut;

/// The file's first bytes.
const MAGIC: &[u8; 8] = b"TDCALIB\n";
/// The version of the layout this build writes and reads.
const VERSION: u16 = 1;

/// What every calibrated class of a degrader has learnt of its healthy prediction scores, to
/// restore in a later process ([`DegraderBuilder::restore_calibrations`](crate::DegraderBuilder::restore_calibrations)),
/// with the tick it was learnt at and the predictor it was learnt from
/// ([`Predictor::fingerprint`](crate::predict::Predictor::fingerprint)), and the service: a
/// calibration is only restored where all three are the same (a model's scores on another
/// tick, or another model's, are another distribution; another service's classes are not
/// these, whatever their names).
///
/// ```no_run
/// # fn demo(degrader: &tower_degrade::Degrader) -> Result<(), tower_degrade::breaker::CalibrationsError> {
/// use tower_degrade::breaker::Calibrations;
///
/// // Before the process ends (and now and then: a crash saves nothing):
/// degrader.calibrations().save("state/calibrations.bin")?;
///
/// // In the next process, before `build`:
/// let saved = Calibrations::load("state/calibrations.bin")?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Calibrations {
    pub(crate) service: String,
    pub(crate) tick: Duration,
    pub(crate) predictor: Option<String>,
    pub(crate) classes: Vec<(String, Learnt)>,
}

/// A calibrations file that could not be read or written, or bytes that are not one.
#[derive(Debug)]
#[non_exhaustive]
pub enum CalibrationsError {
    /// Reading or writing the file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The bytes are not a calibrations record this build can restore: another file, another
    /// version, cut short or damaged, or values no calibration can hold.
    Invalid {
        /// The file, where they were read from one.
        path: Option<PathBuf>,
        /// What is wrong, and where.
        reason: String,
    },
}

impl std::fmt::Display for CalibrationsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io { path, source } => {
                write!(f, "calibrations file {}: {source}", path.display())
            }
            Self::Invalid {
                path: Some(path),
                reason,
            } => write!(f, "calibrations file {}: {reason}", path.display()),
            Self::Invalid { path: None, reason } => write!(f, "calibrations: {reason}"),
        }
    }
}

impl std::error::Error for CalibrationsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Invalid { .. } => None,
        }
    }
}

impl Calibrations {
    /// The service whose degrader learnt them ([`Degrader::builder`](crate::Degrader::builder)'s
    /// name): they are restored only into a degrader of the same service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The tick the calibrations were learnt at.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// The fingerprint of the predictor they were learnt from, if it gave one.
    pub fn predictor(&self) -> Option<&str> {
        self.predictor.as_deref()
    }

    /// The classes with a calibration, and whether each has finished its warm-up.
    pub fn classes(&self) -> impl Iterator<Item = (&str, bool)> {
        self.classes
            .iter()
            .map(|(name, l)| (name.as_str(), matches!(l, Learnt::Fitted(_))))
    }

    /// The record as bytes ([`from_bytes`](Self::from_bytes) reads them back).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(64 + self.classes.len() * 1_024);
        w.extend_from_slice(MAGIC);
        w.extend_from_slice(&VERSION.to_le_bytes());
        put_str(&mut w, &self.service);
        put_u64(
            &mut w,
            u64::try_from(self.tick.as_nanos()).unwrap_or(u64::MAX),
        );
        match &self.predictor {
            None => w.push(0),
            Some(p) => {
                w.push(1);
                put_str(&mut w, p);
            }
        }
        put_u32(&mut w, self.classes.len() as u32);
        for (name, learnt) in &self.classes {
            put_str(&mut w, name);
            match learnt {
                Learnt::WarmingUp(scores) => {
                    w.push(0);
                    put_f64s(&mut w, scores);
                }
                Learnt::Fitted(f) => {
                    w.push(1);
                    put_f64(&mut w, f.start);
                    for n in [f.seen, f.exceeded, f.over, f.runs] {
                        put_u64(&mut w, n);
                    }
                    w.push(u8::from(f.was_over));
                    match f.floor {
                        None => w.push(0),
                        Some((x, until)) => {
                            w.push(1);
                            put_f64(&mut w, x);
                            put_u64(&mut w, until);
                        }
                    }
                    put_f64s(&mut w, &f.peaks);
                }
            }
        }
        let crc = crc32fast::hash(&w);
        put_u32(&mut w, crc);
        w
    }

    /// Read a record written by [`to_bytes`](Self::to_bytes): every field is checked, and what
    /// is wrong is said with where (a byte offset, a class).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CalibrationsError> {
        decode(bytes).map_err(|reason| CalibrationsError::Invalid { path: None, reason })
    }

    /// Write the record to `path`: to a temporary file of its own beside it (two saves at
    /// once do not share one), synced, then renamed over it, and the directory synced, so
    /// that a crash leaves the old record or the new one. The directory must exist. Blocking
    /// file I/O: from async code, in `spawn_blocking`.
    ///
    /// A record of no class is refused, and the file left as it is: a build with a fixed
    /// threshold or without a predictor, saving as the last one did, replaced a half hour's
    /// warm-up with nothing in a user's trial.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), CalibrationsError> {
        let path = path.as_ref();
        if self.classes.is_empty() {
            return Err(CalibrationsError::Invalid {
                path: Some(path.to_path_buf()),
                reason: "nothing to save: no class calibrates its prediction threshold (a \
                         fixed `predict_threshold`, or no predictor attached); the file is left \
                         as it is"
                    .into(),
            });
        }
        let io = |source| CalibrationsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let name = path.file_name().ok_or_else(|| CalibrationsError::Invalid {
            path: Some(path.to_path_buf()),
            reason: "names no file".into(),
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(name);
        prefix.push(".");
        // Removed when dropped, on any error below.
        let mut tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(io)?;
        tmp.write_all(&self.to_bytes()).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        // The rename itself lasts once the directory is synced (where the system allows it).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Read the record in `path` ([`from_bytes`](Self::from_bytes)); the error names the file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, CalibrationsError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| CalibrationsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        decode(&bytes).map_err(|reason| CalibrationsError::Invalid {
            path: Some(path.to_path_buf()),
            reason,
        })
    }
}

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_f64(w: &mut Vec<u8>, v: f64) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    put_u32(w, s.len() as u32);
    w.extend_from_slice(s.as_bytes());
}

fn put_f64s(w: &mut Vec<u8>, v: &[f64]) {
    put_u32(w, v.len() as u32);
    for &x in v {
        put_f64(w, x);
    }
}

/// Reads the fields in order; each error says what was being read and at which byte.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(format!(
                "cut short: {what} at byte {} needs {n} bytes, {left} are left",
                self.at
            ));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    fn flag(&mut self, what: &str) -> Result<bool, String> {
        let at = self.at;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("{what} at byte {at} is {v}, not 0 or 1")),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn f64(&mut self, what: &str) -> Result<f64, String> {
        self.array(what).map(f64::from_le_bytes)
    }

    fn str(&mut self, what: &str) -> Result<String, String> {
        let n = self.u32(what)? as usize;
        let at = self.at;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} at byte {at} is not UTF-8"))
    }

    /// A count, then that many `f64`s: the count is checked against the bytes left before
    /// anything is allocated for it.
    fn f64s(&mut self, what: &str) -> Result<Vec<f64>, String> {
        let n = self.u32(what)? as usize;
        let bytes = self.take(n.saturating_mul(8), what)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8")))
            .collect())
    }
}

fn decode(bytes: &[u8]) -> Result<Calibrations, String> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a calibrations record (it does not begin as one)".into());
    }
    if bytes.len() < MAGIC.len() + 4 {
        return Err(format!("cut short: {} bytes", bytes.len()));
    }
    let body_len = bytes.len() - 4;
    let mut r = Reader {
        bytes: &bytes[..body_len],
        at: MAGIC.len(),
    };
    let (body, sum) = bytes.split_at(body_len);
    let sum = u32::from_le_bytes(sum.try_into().expect("4 bytes"));
    if crc32fast::hash(body) != sum {
        return Err("damaged or cut short: its checksum does not match its bytes".into());
    }
    let version = u16::from_le_bytes(r.array("the version")?);
    if version != VERSION {
        return Err(format!(
            "version {version}: this build reads version {VERSION}"
        ));
    }
    let service = r.str("the service")?;
    let tick = Duration::from_nanos(r.u64("the tick")?);
    if tick.is_zero() {
        return Err("a tick of 0".into());
    }
    let predictor = if r.flag("the predictor's flag")? {
        Some(r.str("the predictor's fingerprint")?)
    } else {
        None
    };
    let n = r.u32("the number of classes")?;
    let mut classes: Vec<(String, Learnt)> = Vec::new();
    // The names so far, hashed: a scan of those before each name was quadratic in the
    // classes: a hostile file of a million short names, 5e11 comparisons, would hold the start
    // for many minutes (a review's estimate, not measured).
    let mut names = std::collections::HashSet::new();
    for i in 0..n {
        let name = r.str(&format!("class {i}'s name"))?;
        let shown = escape_cut(&name, 64);
        if !names.insert(name.clone()) {
            return Err(format!("class {shown} is given twice"));
        }
        let learnt = if r.flag(&format!("class {shown}'s kind"))? {
            let start = r.f64("the tail's start")?;
            let mut counts = [0; 4];
            for c in &mut counts {
                *c = r.u64("the tail's counts")?;
            }
            let [seen, exceeded, over, runs] = counts;
            let was_over = r.flag("the tail's last run")?;
            let floor = if r.flag("the tail's floor flag")? {
                Some((r.f64("the floor")?, r.u64("the floor's end")?))
            } else {
                None
            };
            Learnt::Fitted(Fitted {
                start,
                peaks: r.f64s("the excesses")?,
                seen,
                exceeded,
                over,
                runs,
                was_over,
                floor,
            })
        } else {
            Learnt::WarmingUp(r.f64s("the warm-up scores")?)
        };
        learnt.check().map_err(|e| format!("class {shown}: {e}"))?;
        classes.push((name, learnt));
    }
    if r.at != body_len {
        return Err(format!("{} bytes after the last class", body_len - r.at));
    }
    Ok(Calibrations {
        service,
        tick,
        predictor,
        classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Calibrations {
        Calibrations {
            service: "shop".into(),
            tick: Duration::from_millis(500),
            predictor: Some("p_anomaly.onnx: 1234 bytes, crc32 0badf00d".into()),
            classes: vec![
                ("payment".into(), Learnt::WarmingUp(vec![-3.0, -2.5, -4.25])),
                (
                    "browse".into(),
                    Learnt::Fitted(Fitted {
                        start: -2.0,
                        peaks: vec![0.25, 0.5, 1.75],
                        seen: 5_000,
                        exceeded: 120,
                        over: 120,
                        runs: 90,
                        was_over: true,
                        floor: Some((-0.5, 9_000)),
                    }),
                ),
            ],
        }
    }

    #[test]
    fn a_record_reads_back_as_it_was_written() {
        let c = sample();
        assert_eq!(Calibrations::from_bytes(&c.to_bytes()).unwrap(), c);
        let none = Calibrations {
            predictor: None,
            classes: Vec::new(),
            ..c
        };
        assert_eq!(Calibrations::from_bytes(&none.to_bytes()).unwrap(), none);
    }

    #[test]
    fn every_cut_and_every_flipped_byte_is_refused_with_a_reason() {
        let bytes = sample().to_bytes();
        for n in 0..bytes.len() {
            let e = Calibrations::from_bytes(&bytes[..n]).unwrap_err();
            assert!(matches!(e, CalibrationsError::Invalid { .. }), "{n}: {e}");
        }
        for i in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                let e = refused(&b);
                assert!(e.starts_with("calibrations: "), "{i}: {e}");
            }
        }
    }

    /// Why `bytes` are not a record.
    fn refused(bytes: &[u8]) -> String {
        Calibrations::from_bytes(bytes).unwrap_err().to_string()
    }

    /// Bytes with a valid checksum over fields that are wrong: the field is named.
    fn resealed(mut body: Vec<u8>) -> Vec<u8> {
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        body
    }

    fn body(c: &Calibrations) -> Vec<u8> {
        let b = c.to_bytes();
        b[..b.len() - 4].to_vec()
    }

    #[test]
    fn values_no_calibration_holds_are_refused_naming_the_class() {
        let mut c = sample();
        c.classes[0].1 = Learnt::WarmingUp(vec![-3.0, f64::NAN]);
        let e = refused(&c.to_bytes());
        assert!(e.contains("class payment: warm-up score 1 is NaN"), "{e}");
        let mut c = sample();
        if let Learnt::Fitted(f) = &mut c.classes[1].1 {
            f.peaks[2] = -1.0;
        }
        let e = refused(&c.to_bytes());
        assert!(e.contains("class browse: excess 2 is -1"), "{e}");
        let mut c = sample();
        if let Learnt::Fitted(f) = &mut c.classes[1].1 {
            f.runs = 121;
        }
        let e = refused(&c.to_bytes());
        assert!(e.contains("class browse: counts that do not agree"), "{e}");
        let mut c = sample();
        if let Learnt::Fitted(f) = &mut c.classes[1].1 {
            (f.seen, f.exceeded, f.over, f.runs) = (u64::MAX, 120, 120, 90);
        }
        let e = refused(&c.to_bytes());
        assert!(
            e.contains("class browse: 18446744073709551615 healthy ticks"),
            "{e}"
        );
        let mut c = sample();
        c.classes[1].0 = "payment".into();
        let e = refused(&c.to_bytes());
        assert!(e.contains("class payment is given twice"), "{e}");
        let mut c = sample();
        c.tick = Duration::ZERO;
        let e = refused(&c.to_bytes());
        assert!(e.contains("a tick of 0"), "{e}");
    }

    #[test]
    fn a_count_past_the_bytes_left_is_refused_before_anything_is_allocated() {
        let c = Calibrations {
            classes: vec![("payment".into(), Learnt::WarmingUp(vec![-3.0]))],
            ..sample()
        };
        let mut b = body(&c);
        // The warm-up's count is the 4 bytes before its one score.
        let at = b.len() - 8 - 4;
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = refused(&resealed(b));
        assert!(e.contains("cut short: the warm-up scores"), "{e}");
        let mut b = body(&c);
        b.push(0);
        let e = refused(&resealed(b));
        assert!(e.contains("1 bytes after the last class"), "{e}");
    }

    #[test]
    fn another_file_or_version_says_so() {
        let e = refused(b"{\"classes\": []}");
        assert!(e.contains("not a calibrations record"), "{e}");
        let mut b = body(&sample());
        b[8..10].copy_from_slice(&7u16.to_le_bytes());
        let e = refused(&resealed(b));
        assert!(e.contains("version 7: this build reads version 1"), "{e}");
    }

    #[test]
    fn saves_at_once_to_one_file_each_replace_it_whole() {
        // Each save writes a temporary file of its own: with one shared name, a second save
        // truncated the first's and a half-written record was renamed into place.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calibrations.bin");
        let (a, b) = (
            sample(),
            Calibrations {
                service: "other".into(),
                ..sample()
            },
        );
        a.save(&path).unwrap();
        std::thread::scope(|s| {
            for c in [&a, &b] {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..200 {
                        c.save(path).unwrap();
                    }
                });
            }
            for _ in 0..400 {
                let read = Calibrations::load(&path).unwrap();
                assert!(read == a || read == b);
            }
        });
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn save_replaces_the_file_whole_and_load_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calibrations.bin");
        let c = sample();
        c.save(&path).unwrap();
        assert_eq!(Calibrations::load(&path).unwrap(), c);
        let d = Calibrations {
            service: "other".into(),
            ..c.clone()
        };
        d.save(&path).unwrap();
        assert_eq!(Calibrations::load(&path).unwrap(), d);
        // A record of no class (a build with fixed thresholds saving as the last one did)
        // leaves the file as it is.
        let none = Calibrations {
            classes: Vec::new(),
            ..c
        };
        let e = none.save(&path).unwrap_err().to_string();
        assert!(
            e.contains("nothing to save") && e.contains("left as it is"),
            "{e}"
        );
        assert_eq!(Calibrations::load(&path).unwrap(), d);
        // Nothing left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let missing = dir.path().join("nope.bin");
        let e = Calibrations::load(&missing).unwrap_err();
        assert!(matches!(e, CalibrationsError::Io { .. }));
        assert!(e.to_string().contains("nope.bin"), "{e}");
        std::fs::write(&missing, b"TDCALIB\n").unwrap();
        let e = Calibrations::load(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.bin") && e.contains("cut short"), "{e}");
        let e = d
            .save(dir.path().join("no-such-dir").join("c.bin"))
            .unwrap_err();
        assert!(e.to_string().contains("no-such-dir"), "{e}");
    }

    /// A record read from any bytes is one a calibration restores and learns on from, and
    /// writes back as it was read.
    fn restores_and_learns(c: &Calibrations) {
        assert_eq!(Calibrations::from_bytes(&c.to_bytes()).unwrap(), *c);
        for (_, learnt) in &c.classes {
            let mut cal = super::super::calibrate::Calibrator::restored(
                &super::super::Calibration::default(),
                Duration::from_millis(500),
                learnt.clone(),
            );
            // Past the scores a restored calibration passes without learning them.
            for _ in 0..super::super::RESTORED_UNLEARNT_TICKS {
                cal.observe(0.2);
            }
            for p in [0.01, 0.5, 0.999_999, 1.0, 0.0, 0.2] {
                cal.observe(p);
                let _ = (cal.threshold(), cal.exceeds(p), cal.beyond_reach());
            }
            cal.false_alarm(0.9);
            cal.learnt().check().unwrap();
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_a_record_or_a_reason_never_a_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
        ) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&bytes);
            for input in [&bytes[..], &b[..], &resealed(b.clone())[..]] {
                if let Ok(c) = Calibrations::from_bytes(input) {
                    restores_and_learns(&c);
                }
            }
        }

        #[test]
        fn a_resealed_record_with_bytes_changed_is_one_or_a_reason(
            edits in proptest::collection::vec((0usize..1_000, proptest::num::u8::ANY), 1..6),
        ) {
            let mut b = body(&sample());
            for (at, v) in edits {
                let at = at % b.len();
                b[at] = v;
            }
            if let Ok(c) = Calibrations::from_bytes(&resealed(b)) {
                restores_and_learns(&c);
            }
        }
    }
}
