//! The plugin's logger: upstream's line format (`<RFC3339 time> [<level>] <message>`) on stderr and,
//! with `log_file`, appended to that file (O_APPEND, so concurrent plugin processes do not overwrite
//! each other). Never stdout: stdout carries the CNI result.

use std::fmt;
use std::fs::OpenOptions;
use std::sync::Mutex;
use std::time::SystemTime;

use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use whereabouts_core::config::{LogLevel, LogSettings};

struct UpstreamFormat;

impl<S, N> FormatEvent<S, N> for UpstreamFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::TRACE | Level::DEBUG => LogLevel::Debug,
            Level::INFO | Level::WARN => LogLevel::Verbose,
            Level::ERROR => LogLevel::Error,
        };
        write!(writer, "{} [{}] ", humantime::format_rfc3339_seconds(SystemTime::now()), level.name())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the process-wide logger; later calls in the same process are no-ops. The level applies to
/// whereabouts' own events; the libraries under it (hyper, tower, kube, tonic) log at warn at most, so
/// the log says what whereabouts did and why, not how connections were pooled.
pub fn init(settings: &LogSettings) {
    let max = match settings.level {
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Verbose => LevelFilter::INFO,
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Panic => LevelFilter::OFF,
    };
    let file = settings.file.as_ref().and_then(|path| {
        let opened = OpenOptions::new().create(true).append(true).open(path);
        if opened.is_err() {
            eprint!("Whereabouts logging: cannot open {path}");
        }
        opened.ok()
    });
    let writer = match file {
        Some(file) => BoxMakeWriter::new(std::io::stderr.and(Mutex::new(file))),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let filter = Targets::new().with_default(max.min(LevelFilter::WARN)).with_target("whereabouts", max);
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .event_format(UpstreamFormat)
                .with_writer(writer)
                .with_filter(filter),
        )
        .try_init();
}
