//! `stacyvm certify`: this host's providers taken through a sandbox's life
//! (`provider::certify`), printed as a table (or JSON).

use crate::provider::certify::{Certification, CheckStatus};

/// The table: one line per check with its measured time, then a verdict
/// per provider.
pub fn table(results: &[Certification]) -> String {
    let mut out = format!(
        "{:<12} {:<18} {:<6} {:>9}  {}\n",
        "PROVIDER", "CHECK", "RESULT", "TIME", "DETAIL"
    );
    for result in results {
        for check in &result.checks {
            let status = match (check.status, check.required) {
                (CheckStatus::Pass, _) => "pass",
                (CheckStatus::Fail, true) => "FAIL",
                (CheckStatus::Fail, false) => "warn",
                (CheckStatus::Skip, _) => "skip",
            };
            let time = if check.status == CheckStatus::Skip {
                "-".to_string()
            } else {
                format!("{:.2} s", check.millis as f64 / 1000.0)
            };
            let detail = check.detail.lines().next().unwrap_or_default();
            let detail: String = detail.chars().take(120).collect();
            out.push_str(&format!(
                "{:<12} {:<18} {:<6} {:>9}  {}\n",
                result.provider,
                check.check.as_str(),
                status,
                time,
                detail
            ));
        }
    }
    out.push('\n');
    for result in results {
        let verdict = if result.certified {
            "certified".to_string()
        } else {
            let failed: Vec<&str> = result.failed().iter().map(|c| c.as_str()).collect();
            format!("NOT certified (failed: {})", failed.join(", "))
        };
        out.push_str(&format!("{:<12} {verdict}\n", result.provider));
    }
    out
}
