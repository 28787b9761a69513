//! A TCP proxy in front of PostgreSQL that the suite can cut: while cut, new connections are
//! accepted and dropped at once (refused, in effect) and every connection that was open is
//! broken. Stands for a database outage without touching the machine's server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    pub refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let open = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let refused = Arc::new(AtomicU64::new(0));
        let accepting = Arc::clone(&open);
        let cuts = cut.clone();
        let refusals = Arc::clone(&refused);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if !accepting.load(Ordering::SeqCst) {
                    refusals.fetch_add(1, Ordering::Relaxed);
                    drop(client);
                    continue;
                }
                let mut cut_rx = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            open,
            cut,
            refused,
            task,
        })
    }

    /// Refuses new connections and breaks the existing ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
