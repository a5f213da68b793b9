//! The system rule's signal: the host's CPU usage between two control ticks, from `/proc/stat`.

use std::path::Path;

const STAT: &str = "/proc/stat";

/// CPU usage between consecutive reads.
#[derive(Debug, Default)]
pub(crate) struct CpuSignal {
    last: Option<(u64, u64)>,
}

impl CpuSignal {
    /// Whether the signal can be read here.
    pub(crate) fn check() -> Result<(), String> {
        read(Path::new(STAT))
            .map(drop)
            .map_err(|e| format!("the CPU signal needs {STAT} (Linux): {e}"))
    }

    /// The share of CPU time spent busy since the previous call (`None` on the first call or
    /// when the file cannot be read).
    pub(crate) fn usage(&mut self) -> Option<f64> {
        let (busy, total) = read(Path::new(STAT)).ok()?;
        let prev = self.last.replace((busy, total))?;
        let dt = total.saturating_sub(prev.1);
        (dt > 0).then(|| busy.saturating_sub(prev.0) as f64 / dt as f64)
    }
}

/// (busy, total) jiffies of the aggregate `cpu` line.
fn read(path: &Path) -> Result<(u64, u64), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    parse(&text)
}

fn parse(text: &str) -> Result<(u64, u64), String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or("no aggregate `cpu` line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>().map_err(|e| format!("field `{f}`: {e}")))
        .collect::<Result<_, _>>()?;
    if fields.len() < 4 {
        return Err(format!(
            "{} fields on the `cpu` line, expected at least 4",
            fields.len()
        ));
    }
    let total: u64 = fields.iter().sum();
    // idle + iowait are not busy.
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_aggregate_line() {
        let text = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse(text), Ok((200, 1000)));
        assert!(parse("intr 1 2 3").unwrap_err().contains("no aggregate"));
        assert!(parse("cpu  1 x 3 4").unwrap_err().contains("field `x`"));
    }
}
