//! Durable events: the agent's own events (sync.progress, sync.conflict, health) go into the
//! daemon's change log first, then the MQTT channel publishes them. Nothing waits in memory.

use hms_edge_wire::api::EventRequest;
use hms_edge_wire::client::InternalClient;

/// Whether a broker is configured. Without one the agent records no events of its own (they would
/// only pile up in the outbox of a box that has no broker).
pub static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records an event (best effort: a failure is logged; the sync itself already happened).
pub async fn record(internal: &InternalClient, event: &str, payload: serde_json::Value) {
    if !ENABLED.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let req = EventRequest { event: event.to_owned(), payload };
    if let Err(e) = internal.post::<serde_json::Value>("/v1/events", &req).await {
        tracing::warn!(event, error = %e, "could not record event");
    }
}
