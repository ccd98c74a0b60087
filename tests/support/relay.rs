//! TCP relays: one in front of a server that can stop passing bytes, as a stalled API server or
//! a black-holed network does (connections stay open, requests go unanswered), or pass them
//! late, as a loaded API server does; and a balancer in
//! front of a Service's replicas, which passes each connection to the next replica that
//! accepts it, as kube-proxy does once a dead pod's endpoint is gone.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    pub addr: SocketAddr,
    gate: Arc<Gate>,
    task: tokio::task::JoinHandle<()>,
}

/// What a relay does to the bytes it passes.
#[derive(Default)]
struct Gate {
    /// Nothing passes.
    frozen: AtomicBool,
    /// Each read is held this long before it is passed on.
    delay_ms: AtomicU64,
    /// Reads held so far.
    delayed: AtomicU64,
}

impl Relay {
    /// Relays 127.0.0.1:<a free port> to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Gate::default());
        let held = gate.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, held.clone()));
                tokio::spawn(pipe(server_read, client_write, held.clone()));
            }
        });
        Self { addr, gate, task }
    }

    /// From now on, nothing passes either way.
    pub fn freeze(&self) {
        self.gate.frozen.store(true, Ordering::SeqCst);
    }

    /// From now on, every read is passed on `delay` late, each way.
    pub fn slow(&self, delay: Duration) {
        (self.gate.delay_ms).store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Reads passed on late so far.
    pub fn delayed(&self) -> u64 {
        self.gate.delayed.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Service in front of replicas that come and go.
pub struct Balancer {
    pub addr: SocketAddr,
    upstreams: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstreams: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let next = Arc::new(AtomicUsize::new(0));
        let shared = upstreams.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstreams, next) = (shared.clone(), next.clone());
                tokio::spawn(async move {
                    let candidates = upstreams.lock().unwrap().clone();
                    let first = next.fetch_add(1, Ordering::Relaxed);
                    for n in 0..candidates.len() {
                        let upstream = candidates[(first + n) % candidates.len()];
                        if let Ok(server) = TcpStream::connect(upstream).await {
                            let open = Arc::new(Gate::default());
                            let (client_read, client_write) = client.into_split();
                            let (server_read, server_write) = server.into_split();
                            tokio::spawn(pipe(client_read, server_write, open.clone()));
                            tokio::spawn(pipe(server_read, client_write, open));
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            upstreams,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The replicas connections go to, from now on.
    pub fn route_to(&self, upstreams: Vec<SocketAddr>) {
        *self.upstreams.lock().unwrap() = upstreams;
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    gate: Arc<Gate>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Held, not dropped: the peer waits for an answer that does not come.
        while gate.frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let delay = gate.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            gate.delayed.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
