//! HTTPS listener: rustls in front of an axum router, one task per connection, the TLS
//! certificate taken fresh from the [`TlsReloader`] for every handshake (so SIGHUP applies to new
//! connections), and the bounds that keep idle or slow callers from taking the port: a
//! handshake deadline, a header-read deadline, an idle deadline, a body-read deadline (in the
//! handlers), a connection limit and a per-address limit.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http_caller::ClientAddr;
use crate::tls::TlsReloader;

/// A client has this long to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An HTTP/1 request's headers must arrive within this, counted from its first byte.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection on which no byte moved either way for this long is closed (keep-alive clients
/// reconnect; a request in progress moves bytes or finishes within the store's deadlines).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections from one source address (ward workstations each have their own).
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;

/// Serves `app` over TLS on `listener` until `shutdown` is cancelled. In-flight connections are
/// tracked by `tasks` so the drain can wait for them.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
    client_auth: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    max_connections: usize,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    // Over either limit a socket is closed at once: the accept loop never waits, so one caller
    // holding every place cannot queue the others behind it in the kernel's backlog.
    let gate = crate::conn_gate::ConnGate::new(
        "https",
        max_connections.max(1),
        MAX_CONNECTIONS_PER_ADDRESS,
    );
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let permit = match gate.try_admit(peer.ip()).map_err(|w| w.as_str()) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(%peer, limit = why, "HTTPS connection refused");
                metrics::counter!("hms_https_connections_refused_total", "reason" => why)
                    .increment(1);
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let cfg = client_auth.clone().unwrap_or_else(|| tls.current());
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let app = app.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let tls_stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            // A verified client certificate names a fixed workstation (see `http_caller`).
            let cn: Option<Arc<str>> = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::tls::subject_cn(c))
                .map(Arc::from);
            let app = app.layer(axum::Extension(ClientAddr(peer, cn)));
            let service = TowerToHyperService::new(app);
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder.http2().timer(hyper_util::rt::TokioTimer::new());
            let (io, last_active) = Activity::new(tls_stream);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let mut check = tokio::time::interval(IDLE_TIMEOUT / 4);
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = check.tick() => {
                        if last_active.idle_for() >= IDLE_TIMEOUT {
                            tracing::debug!(%peer, "idle HTTPS connection closed");
                            break;
                        }
                    }
                    () = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(IDLE_TIMEOUT, conn.as_mut()).await;
                        break;
                    }
                }
            }
        });
    }
}

/// When bytes last moved on a connection.
#[derive(Clone)]
struct LastActive {
    base: Instant,
    ms: Arc<AtomicU64>,
}

impl LastActive {
    fn touch(&self) {
        self.ms.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

/// A stream that records when bytes last moved through it, for the idle deadline.
struct Activity<S> {
    inner: S,
    last: LastActive,
}

impl<S> Activity<S> {
    fn new(inner: S) -> (Self, LastActive) {
        let last = LastActive { base: Instant::now(), ms: Arc::new(AtomicU64::new(0)) };
        (Activity { inner, last: last.clone() }, last)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
