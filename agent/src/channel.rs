//! What every channel shares: its counters (reported to hms-edged for `hms-edge status` and
//! `/metrics`), the loop that runs rounds with backoff, and how a round fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hms_edge_wire::client::{ClientError, InternalClient};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::upstream::UpstreamError;

/// Why a round stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Internal(#[from] ClientError),
}

/// Counters of one channel since the agent started, plus the last outcome.
#[derive(Debug, Default)]
pub struct ChannelStats {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub conflicts: AtomicU64,
    pub parked: AtomicU64,
    pub rejected: AtomicU64,
    pub last_success_ms: AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
    pub link_up: std::sync::atomic::AtomicBool,
}

impl ChannelStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> serde_json::Value {
        json!({
            "link": if self.link_up.load(Ordering::Relaxed) { "up" } else { "down" },
            "last_success_ms": self.last_success_ms.load(Ordering::Relaxed),
            "last_error": self.last_error.lock().expect("stats lock").clone(),
            "sent": self.sent.load(Ordering::Relaxed),
            "received": self.received.load(Ordering::Relaxed),
            "bytes_sent": self.bytes_sent.load(Ordering::Relaxed),
            "conflicts": self.conflicts.load(Ordering::Relaxed),
            "parked": self.parked.load(Ordering::Relaxed),
            "rejected": self.rejected.load(Ordering::Relaxed),
        })
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)] // one call site per channel, each argument named there
/// Runs `round` forever: after a success wait `interval` (or go again at once when the round
/// says there is more), after a failure back off; a wake-up (sync-now) cuts any wait short.
pub async fn run_loop<F, Fut>(
    name: &'static str,
    internal: InternalClient,
    stats: Arc<ChannelStats>,
    interval: Duration,
    max_backoff: Duration,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, RoundError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(500), max_backoff);
    while !shutdown.is_cancelled() {
        let wait = match round().await {
            Ok(more) => {
                backoff.succeed();
                stats.link_up.store(true, Ordering::Relaxed);
                stats.last_success_ms.store(now_ms(), Ordering::Relaxed);
                *stats.last_error.lock().expect("stats lock") = None;
                if more { Duration::ZERO } else { interval }
            }
            Err(e) => {
                let wait = backoff.fail();
                if matches!(e, RoundError::Upstream(_)) {
                    stats.link_up.store(false, Ordering::Relaxed);
                }
                tracing::warn!(channel = name, error = %e, retry_in_ms = wait.as_millis() as u64, "sync round failed");
                *stats.last_error.lock().expect("stats lock") = Some(e.to_string());
                wait
            }
        };
        let _ = internal.put_state(&format!("status.{name}"), &stats.snapshot()).await;
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => {}
            () = shutdown.cancelled() => {}
        }
    }
}
