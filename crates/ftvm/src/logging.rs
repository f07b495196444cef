//! ftvm's own messages: tracing-subscriber on standard error, as human text (the default) or
//! JSON lines (`--log-format json`, for log shippers), and the pair's events (target
//! [`EVENT_TARGET`]) also published as JSON lines to the API's `GET /events`.
//!
//! The library crates emit the pair's events (paired, PROTECTED, TAKEOVER, HALT, a rejected
//! frame, a resync, the backup lost, ...) as tracing events with target `ftvm::event`, a
//! field `event` naming the kind and fields for the figures. In the text format they read
//! as they always did, `ftvm: <message>`, and they are shown at the default level (warn):
//! the filter enables `ftvm::event=info` unless it names that target itself. The command
//! line's own lines ([`say`]) stay `ftvm: ...` text, and are JSON too in the JSON format.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FmtSpan, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

/// The target of the pair's events.
pub const EVENT_TARGET: &str = "ftvm::event";
/// The target of the command line's own lines ([`say`]) in the JSON format.
pub const CLI_TARGET: &str = "ftvm::cli";

/// The start of every text line: `ftvm`, or `ftvm[ID]` for a VM started with `--id ID`, so
/// that the lines of several VMs on one host (one journal) tell which VM said what.
static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn prefix() -> &'static str {
    PREFIX.get().map(String::as_str).unwrap_or("ftvm")
}

/// Names the VM in every text line from now on (`--id`).
pub fn set_id(id: &str) {
    let _ = PREFIX.set(format!("ftvm[{id}]"));
}

/// Whether `--log-format json` is in force.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One of the command line's own lines (an error, a warning, a report): as text,
/// `ftvm: <line>` (as always); in the JSON format, an event of target `ftvm::cli` whose level
/// follows the line (`error: ...` an error, `WARNING: ...` a warning, the rest info), so that
/// every line on standard error is JSON.
pub fn say(line: fmt::Arguments<'_>) {
    if !JSON.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("{}: {line}", prefix());
        return;
    }
    let line = line.to_string();
    if let Some(rest) = line.strip_prefix("error: ") {
        tracing::error!(target: "ftvm::cli", "{rest}");
    } else if let Some(rest) = line.strip_prefix("WARNING: ") {
        tracing::warn!(target: "ftvm::cli", "{rest}");
    } else {
        tracing::info!(target: "ftvm::cli", "{line}");
    }
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human text: `ftvm: ...` for the pair's events, level and message for the rest.
    Text,
    /// One JSON object a line: timestamp, level, target and the event's fields.
    Json,
}

/// Why the logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log filter {filter:?} (from {from}): {source}")]
    Filter { filter: String, from: &'static str, source: tracing_subscriber::filter::ParseError },
}

/// The filter: FTVM_LOG if set, else `--log-level`; the pair's events at info unless the
/// filter says otherwise about them.
fn filter(level: &str) -> Result<tracing_subscriber::EnvFilter, LoggingError> {
    let (text, from) = match std::env::var("FTVM_LOG") {
        Ok(v) if !v.is_empty() => (v, "FTVM_LOG"),
        _ => (level.to_string(), "--log-level"),
    };
    let mut directives = text.clone();
    for target in [EVENT_TARGET, CLI_TARGET] {
        if !text.contains(target) {
            directives.push_str(&format!(",{target}=info"));
        }
    }
    tracing_subscriber::EnvFilter::builder().parse(&directives).map_err(|source| LoggingError::Filter {
        filter: text,
        from,
        source,
    })
}

/// Installs the subscriber for the whole process.
pub fn init(level: &str, format: LogFormat) -> Result<(), LoggingError> {
    let filter = filter(level)?;
    JSON.store(format == LogFormat::Json, std::sync::atomic::Ordering::Relaxed);
    let registry = tracing_subscriber::registry().with(filter).with(EventsToApi);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .event_format(Human { inner: tracing_subscriber::fmt::format().with_target(false) }),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_span_events(FmtSpan::NONE)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    Ok(())
}

/// The text format: the pair's events as `ftvm: <message>` (as ftvm always printed them),
/// everything else as tracing-subscriber's full format.
struct Human {
    inner: tracing_subscriber::fmt::format::Format<
        tracing_subscriber::fmt::format::Full,
        tracing_subscriber::fmt::time::SystemTime,
    >,
}

impl<S, N> FormatEvent<S, N> for Human
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        if event.metadata().target() != EVENT_TARGET {
            return self.inner.format_event(ctx, writer, event);
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        writeln!(writer, "{}: {}", prefix(), message.0)
    }
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

/// Publishes each of the pair's events to `GET /events` as a JSON object: its fields, the
/// message, the level and the time.
struct EventsToApi;

impl<S: Subscriber> Layer<S> for EventsToApi {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != EVENT_TARGET {
            return;
        }
        let mut fields = JsonFields(serde_json::Map::new());
        let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        fields.0.insert("time".into(), serde_json::json!((time.as_secs_f64() * 1e3).round() / 1e3));
        fields.0.insert("level".into(), event.metadata().level().as_str().to_ascii_lowercase().into());
        event.record(&mut fields);
        ftvm_api::events::publish(fields.0);
    }
}

struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), serde_json::json!(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pair_events_are_on_at_the_default_level_unless_the_filter_names_them() {
        let f = filter("warn").unwrap().to_string();
        assert!(f.contains("ftvm::event=info"), "{f}");
        let f = filter("warn,ftvm::event=off").unwrap().to_string();
        assert!(f.contains("ftvm::event=off") && !f.contains("ftvm::event=info"), "{f}");
    }

    #[test]
    fn a_bad_filter_is_an_error_that_names_it() {
        let e = filter("warn,x=notalevel").unwrap_err();
        assert!(e.to_string().contains("notalevel"), "{e}");
    }
}
