//! Manual commands.

use crate::error::UnknownCommand;

/// A manual command, from an admin endpoint or an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// Admit nothing until reset.
    ForceOpen,
    /// Admit everything until reset (the breaker is disabled).
    ForceClosed,
    /// Degrade the class until reset.
    Degrade,
    /// Decide and report, enforce nothing, until reset.
    MetricsOnly,
    /// Back to automatic control, closed, with counters cleared.
    Reset,
}

/// Every command's name, in declaration order.
const NAMES: [&str; 5] = [
    "force_open",
    "force_closed",
    "degrade",
    "metrics_only",
    "reset",
];

impl Command {
    /// Every command, in declaration order (the order of [`NAMES`]).
    const ALL: [Command; 5] = [
        Command::ForceOpen,
        Command::ForceClosed,
        Command::Degrade,
        Command::MetricsOnly,
        Command::Reset,
    ];

    /// The command's name, as parsed by [`str::parse`].
    pub fn as_str(self) -> &'static str {
        NAMES[self as usize]
    }
}

/// Parses `force_open`, `force_closed`, `degrade`, `metrics_only` or `reset` (for admin
/// endpoints).
///
/// ```
/// use tower_degrade::breaker::Command;
///
/// assert_eq!("force_open".parse::<Command>(), Ok(Command::ForceOpen));
/// assert!("explode".parse::<Command>().unwrap_err().to_string().contains("force_open"));
/// ```
impl std::str::FromStr for Command {
    type Err = UnknownCommand;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NAMES
            .iter()
            .position(|n| *n == s)
            .map(|i| Command::ALL[i])
            .ok_or_else(|| UnknownCommand {
                given: s.chars().take(64).collect(),
                expected: &NAMES,
            })
    }
}
