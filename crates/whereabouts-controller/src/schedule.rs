//! When the reconciler runs: a cron expression (UTC), from the first of these that is set:
//!
//! 1. the mounted ConfigMap file (`/cron-schedule/config`: ConfigMap `whereabouts-config`, key
//!    `cron-expression`);
//! 2. the environment variable `WHEREABOUTS_RECONCILER_CRON`;
//! 3. `reconciler_cron_expression` in the flat file (`whereabouts.conf`);
//! 4. `30 4 * * *`, upstream's default.
//!
//! The sources are read again every few seconds and a changed expression takes effect at once (a
//! ConfigMap update reaches the mounted file within a minute or so). Upstream watched the directory
//! with inotify for the ConfigMap's symlink swap, and crashed on a read error; polling sees every way
//! the file can change. An invalid expression is logged and the schedule in force is kept (at start,
//! the default), so a typo never stops the rest of the controller.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Year};
use serde_json::Value;

/// Upstream's default schedule: every day at 04:30 UTC.
pub const DEFAULT_EXPRESSION: &str = "30 4 * * *";
/// Where the DaemonSet mounts the `whereabouts-config` ConfigMap's `cron-expression`.
pub const DEFAULT_FILE: &str = "/cron-schedule/config";
/// The environment variable that sets the schedule when the file is absent.
pub const ENV: &str = "WHEREABOUTS_RECONCILER_CRON";

/// Why an expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reconciler schedule {expression:?} from {source_name}: {reason}")]
pub struct ScheduleError {
    /// The expression as written.
    pub expression: String,
    /// Where it came from.
    pub source_name: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Where the expression may come from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The mounted ConfigMap file.
    pub file: PathBuf,
    /// The value of [`ENV`], read at start.
    pub env: Option<String>,
    /// The flat files to look in, in order (the first that exists is used).
    pub flat_files: Vec<PathBuf>,
}

/// A schedule in force.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The expression.
    pub expression: String,
    /// Where it came from.
    pub source_name: String,
    cron: Cron,
}

impl Schedule {
    /// Parses a 5-field cron expression (a 6th, leading, seconds field and `@daily`-style descriptors
    /// are accepted too). A `CRON_TZ=UTC`/`TZ=UTC` prefix is accepted; other time zones are refused,
    /// because the schedule runs in UTC.
    pub fn parse(expression: &str, source_name: &str) -> Result<Schedule, ScheduleError> {
        let error = |reason: String| ScheduleError {
            expression: expression.to_string(),
            source_name: source_name.to_string(),
            reason,
        };
        let mut pattern = expression.trim();
        for prefix in ["CRON_TZ=", "TZ="] {
            if let Some(rest) = pattern.strip_prefix(prefix) {
                let (zone, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                if !matches!(zone, "UTC" | "Etc/UTC") {
                    return Err(error(format!("time zone {zone} is not supported: schedules run in UTC")));
                }
                pattern = rest.trim();
            }
        }
        if pattern.is_empty() {
            return Err(error("the expression is empty".into()));
        }
        let cron = CronParser::builder()
            .year(Year::Disallowed)
            .build()
            .parse(pattern)
            .map_err(|e| error(e.to_string()))?;
        Ok(Schedule { expression: expression.trim().to_string(), source_name: source_name.to_string(), cron })
    }

    /// The first run strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&after, false).ok()
    }
}

impl Sources {
    /// The upstream locations: the ConfigMap file, `WHEREABOUTS_RECONCILER_CRON`, and the flat file's
    /// usual places.
    pub fn standard() -> Sources {
        Sources {
            file: DEFAULT_FILE.into(),
            env: std::env::var(ENV).ok(),
            flat_files: whereabouts_core::config::FLAT_FILE_PATHS.iter().map(PathBuf::from).collect(),
        }
    }

    /// The expression of the first source that sets one, and that source's name.
    pub fn expression(&self) -> (String, String) {
        if let Ok(text) = std::fs::read_to_string(&self.file)
            && !text.trim().is_empty()
        {
            return (text.trim().to_string(), self.file.display().to_string());
        }
        if let Some(value) = self.env.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
            return (value.to_string(), ENV.to_string());
        }
        for path in &self.flat_files {
            let Ok(text) = std::fs::read(path) else { continue };
            let value = flat_file_expression(&text);
            if let Some(value) = value {
                return (value, format!("reconciler_cron_expression in {}", path.display()));
            }
            break;
        }
        (DEFAULT_EXPRESSION.to_string(), "the default".to_string())
    }

    /// The schedule the sources set now.
    pub fn resolve(&self) -> Result<Schedule, ScheduleError> {
        let (expression, source_name) = self.expression();
        Schedule::parse(&expression, &source_name)
    }
}

/// `reconciler_cron_expression` of a flat file (keys are case-insensitive, as the plugin reads them).
fn flat_file_expression(content: &[u8]) -> Option<String> {
    let Value::Object(map) = serde_json::from_slice(content).ok()? else { return None };
    map.iter()
        .find(|(key, _)| key.eq_ignore_ascii_case("reconciler_cron_expression"))
        .and_then(|(_, value)| value.as_str())
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .map(str::to_string)
}

/// Runs `job` on the schedule the sources set, re-reading them every `reload`; never returns. A run
/// that is still going when the next is due delays it (runs never overlap).
pub async fn run<F, Fut>(sources: &Sources, reload: Duration, mut job: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut current = initial(sources);
    let mut next = current.next_after(Utc::now());
    loop {
        let wait = next.map_or(reload, |at| (at - Utc::now()).to_std().unwrap_or_default().min(reload));
        tokio::time::sleep(wait).await;
        match sources.resolve() {
            Ok(schedule) if schedule.expression != current.expression => {
                tracing::info!(
                    "reconciler schedule changed to {:?} (from {})",
                    schedule.expression,
                    schedule.source_name
                );
                current = schedule;
                next = current.next_after(Utc::now());
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::error!("{e}; keeping {:?}", current.expression),
        }
        if next.is_some_and(|at| at <= Utc::now()) {
            job().await;
            next = current.next_after(Utc::now());
        }
    }
}

fn initial(sources: &Sources) -> Schedule {
    let schedule = sources.resolve().unwrap_or_else(|e| {
        tracing::error!("{e}; using {DEFAULT_EXPRESSION:?} until it is fixed");
        Schedule::parse(DEFAULT_EXPRESSION, "the default")
            .unwrap_or_else(|_| unreachable!("the default parses"))
    });
    tracing::info!("reconciler schedule {:?} (from {})", schedule.expression, schedule.source_name);
    schedule
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, h, m, s).unwrap()
    }

    #[test]
    fn five_field_expressions_and_descriptors() {
        let daily = Schedule::parse("30 4 * * *", "test").unwrap();
        assert_eq!(daily.next_after(at(3, 0, 0)), Some(at(4, 30, 0)));
        assert_eq!(daily.next_after(at(4, 30, 0)), Some(at(4, 30, 0) + chrono::Duration::days(1)));
        let five = Schedule::parse("*/5 * * * *", "test").unwrap();
        assert_eq!(five.next_after(at(10, 2, 7)), Some(at(10, 5, 0)));
        assert!(Schedule::parse("@hourly", "test").is_ok());
        assert!(Schedule::parse("CRON_TZ=UTC 0 * * * *", "test").is_ok());
    }

    #[test]
    fn refusals_name_the_source_and_value() {
        let e = Schedule::parse("61 * * * *", "WHEREABOUTS_RECONCILER_CRON").unwrap_err();
        assert!(e.to_string().contains("\"61 * * * *\" from WHEREABOUTS_RECONCILER_CRON"), "{e}");
        assert!(Schedule::parse("  ", "x").unwrap_err().reason.contains("empty"));
        let zone = Schedule::parse("TZ=Europe/Berlin 0 * * * *", "x").unwrap_err();
        assert!(zone.reason.contains("Europe/Berlin"), "{zone}");
        assert!(Schedule::parse("0 0 * * * * 2027", "x").is_err(), "no year field");
    }

    #[test]
    fn sources_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        let flat = dir.path().join("whereabouts.conf");
        let sources =
            Sources { file: file.clone(), env: Some("*/7 * * * *".into()), flat_files: vec![flat.clone()] };
        assert_eq!(sources.expression().0, "*/7 * * * *");
        std::fs::write(&file, " */3 * * * *\n").unwrap();
        assert_eq!(sources.expression(), ("*/3 * * * *".into(), file.display().to_string()));
        let without_env = Sources { env: None, file: dir.path().join("absent"), ..sources.clone() };
        assert_eq!(without_env.expression().0, DEFAULT_EXPRESSION);
        std::fs::write(&flat, r#"{"datastore":"kubernetes","Reconciler_Cron_Expression":"0 1 * * *"}"#)
            .unwrap();
        assert_eq!(without_env.expression().0, "0 1 * * *");
    }

    #[tokio::test]
    async fn runs_on_schedule_and_follows_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        std::fs::write(&file, "not a schedule").unwrap();
        let sources = Sources { file: file.clone(), env: None, flat_files: Vec::new() };
        assert_eq!(initial(&sources).expression, DEFAULT_EXPRESSION, "an invalid start falls back");
        // Every second (the optional seconds field), then once a year.
        std::fs::write(&file, "* * * * * *").unwrap();
        let runs = std::sync::atomic::AtomicU32::new(0);
        let count = || runs.load(std::sync::atomic::Ordering::SeqCst);
        let scheduler = run(&sources, Duration::from_millis(100), || async {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        tokio::pin!(scheduler);
        let _ = tokio::time::timeout(Duration::from_millis(2600), &mut scheduler).await;
        assert!(count() >= 2, "ran {} times in 2.6 s on a schedule of every second", count());
        std::fs::write(&file, "0 0 1 1 *").unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(300), &mut scheduler).await;
        let after_change = count();
        let _ = tokio::time::timeout(Duration::from_millis(2000), &mut scheduler).await;
        assert_eq!(count(), after_change, "the new schedule is not due for months");
    }
}
