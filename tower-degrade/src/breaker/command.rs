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

impl Command {
    pub(crate) const ALL: [(Command, &'static str); 5] = [
        (Command::ForceOpen, "force_open"),
        (Command::ForceClosed, "force_closed"),
        (Command::Degrade, "degrade"),
        (Command::MetricsOnly, "metrics_only"),
        (Command::Reset, "reset"),
    ];

    /// The command's name, as parsed by [`str::parse`].
    pub fn as_str(self) -> &'static str {
        Command::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("reset", |(_, n)| n)
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
        Command::ALL
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(c, _)| *c)
            .ok_or_else(|| UnknownCommand(s.chars().take(64).collect()))
    }
}
