//! Serving a router on a socket within bounds: how many connections are open at once, how long
//! a client may take over a request's head (which is also how long a kept-alive connection may
//! sit between requests), how long a connection may go with no byte moving either way, and,
//! with TLS, how long a handshake may take. Every listener Pacer opens is served here.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

/// Bounds on one listener's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; past it, new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Longest from a connection's opening, or the end of its last response, to a complete
    /// request head.
    pub header_read_timeout: Duration,
    /// Longest a connection may go with no byte read or written. Longer than the request
    /// timeout, which bounds a handler that computes without moving bytes.
    pub idle_timeout: Duration,
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
}

impl Limits {
    /// The main listener (webhooks, runner callbacks, health): kept well under a container's
    /// common open-file limit of 1,024, which the controller's own clients share.
    pub const MAIN: Self = Self {
        max_connections: 512,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
        handshake_timeout: Duration::from_secs(10),
    };
    /// The metrics and ACME HTTP-01 listeners: a scraper, or a CA's few validators.
    pub const SIDE: Self = Self {
        max_connections: 64,
        ..Self::MAIN
    };
}

/// How a listener's connections are carried.
#[derive(Clone)]
pub enum Transport {
    Plain,
    Tls(tokio_rustls::TlsAcceptor),
}

/// Serves `router` on `listener` within `limits` until `shutdown`; then stops accepting, lets
/// each open connection finish the request it is on, and returns once all have closed.
pub async fn serve(
    listener: TcpListener,
    transport: Transport,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore stays open"),
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: give others time to close.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (transport, router, stopping) = (transport.clone(), router.clone(), stopping.clone());
        tokio::spawn(async move {
            match transport {
                Transport::Plain => connection(tcp, router, limits, stopping, permit).await,
                Transport::Tls(acceptor) => {
                    let handshake = acceptor.accept(tcp);
                    match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                        Ok(Ok(tls)) => connection(tls, router, limits, stopping, permit).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}

/// Serves HTTP/1.1 on one connection until the client or a limit closes it.
async fn connection<S>(
    io: S,
    router: Router,
    limits: Limits,
    mut stopping: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: io,
        activity: activity.clone(),
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let served = http.serve_connection(io, TowerToHyperService::new(router));
    tokio::pin!(served);
    let mut draining = false;
    loop {
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    debug!(error = %e, "connection closed");
                }
                return;
            }
            () = activity.quiet_for(limits.idle_timeout) => {
                debug!("connection closed: idle");
                return;
            }
            _ = stopping.wait_for(|stop| *stop), if !draining => {
                draining = true;
                served.as_mut().graceful_shutdown();
            }
        }
    }
}

/// When a connection last moved a byte.
struct Activity {
    start: Instant,
    /// Milliseconds from `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `quiet`.
    async fn quiet_for(&self, quiet: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let since = last.elapsed();
            if since >= quiet {
                return;
            }
            tokio::time::sleep(quiet - since).await;
        }
    }
}

/// A connection that records in [`Activity`] every read or write that moved bytes.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
