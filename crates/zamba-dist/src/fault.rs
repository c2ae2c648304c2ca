//! Which rank is at fault, told by the rank that noticed to the launcher. A rank that fails
//! because another rank hung or died (a collective timed out waiting for it, its connection
//! broke) often exits first; its error names the culprit. Under `zamba-train launch` it writes
//! one machine-readable line to stderr, so that the launcher's summary blames the culprit rather
//! than the rank that noticed.

use crate::DistError;

/// Set by the launcher in every rank's environment: print fault lines.
pub const FAULT_LINES_ENV: &str = "ZAMBA_LAUNCH_FAULT_LINES";
const PREFIX: &str = "zamba-dist fault: blame=";
const SEPARATOR: &str = " | ";

/// What a rank reported: the ranks it blames, and its error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultReport {
    pub blamed: Vec<usize>,
    pub error: String,
}

impl FaultReport {
    /// The report of `error`, if it blames other ranks.
    pub fn of(error: &DistError) -> Option<Self> {
        let blamed = match error {
            DistError::Timeout { ranks, .. } if !ranks.is_empty() => ranks.clone(),
            DistError::PeerLost { rank, .. } => vec![*rank],
            _ => return None,
        };
        Some(Self {
            blamed,
            error: error.to_string().replace('\n', " "),
        })
    }

    pub fn to_line(&self) -> String {
        let ranks: Vec<String> = self.blamed.iter().map(usize::to_string).collect();
        format!("{PREFIX}{}{SEPARATOR}{}", ranks.join(","), self.error)
    }

    /// Parses a line written by [`to_line`](Self::to_line) (without its newline).
    pub fn parse(line: &str) -> Option<Self> {
        let (ranks, error) = line.strip_prefix(PREFIX)?.split_once(SEPARATOR)?;
        let blamed = ranks
            .split(',')
            .map(|r| r.parse().ok())
            .collect::<Option<Vec<usize>>>()?;
        Some(Self {
            blamed,
            error: error.to_string(),
        })
    }
}

/// Writes the fault line of `error` to stderr when running under `zamba-train launch` and the
/// error blames other ranks.
pub fn report_fault(error: &DistError) {
    if std::env::var_os(FAULT_LINES_ENV).is_some()
        && let Some(report) = FaultReport::of(error)
    {
        eprintln!("{}", report.to_line());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_only_blames_come_out() {
        let timeout = DistError::Timeout {
            op: "all_reduce #3".into(),
            timeout_s: 1.5,
            ranks: vec![1, 3],
        };
        let report = FaultReport::of(&timeout).unwrap();
        assert_eq!(report.blamed, vec![1, 3]);
        assert_eq!(FaultReport::parse(&report.to_line()), Some(report));
        assert_eq!(
            FaultReport::of(&DistError::Invalid("bad config".into())),
            None
        );
        assert_eq!(FaultReport::parse("[rank 0] hello"), None);
        assert_eq!(FaultReport::parse("zamba-dist fault: blame=x | y"), None);
    }
}
