//! Logging: journald when systemd gave us a journal stream, human-readable stderr otherwise.
//! The filter is reloadable (SIGHUP) through [`LogHandle`].

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::{LogConfig, LogTarget};

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogHandle")
    }
}

impl LogHandle {
    /// Applies a new filter (already validated by config parsing).
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = EnvFilter::builder().parse(level).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// Whether logs go to the journal: forced by config, or `auto` and `$JOURNAL_STREAM` is set
/// (systemd connects stderr to the journal and says so in that variable).
pub fn wants_journald(target: LogTarget) -> bool {
    match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    }
}

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(cfg: &LogConfig) -> LogHandle {
    let filter = EnvFilter::builder().parse(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter_layer, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter_layer);
    let journald = if wants_journald(cfg.target) { tracing_journald::layer().ok() } else { None };
    match journald {
        Some(layer) => registry.with(layer.with_syslog_identifier("hms-edged".into())).init(),
        None => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false))
            .init(),
    }
    LogHandle(handle)
}
