//! An impaired network path in-process: a UDP forwarder that drops, delays and jitters
//! datagrams between clients and a relay, seeded so runs repeat. Kernel netem is not
//! available everywhere (not on our CI machines), and benchmarks and tests need the same
//! impairment on every machine.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What happens to each datagram, in each direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Share of datagrams dropped, 0.0..=1.0.
    pub loss: f64,
    /// One-way delay added to every datagram.
    pub delay: Duration,
    /// Extra delay, uniform in 0..jitter, per datagram. Datagrams keep their order (a late
    /// one holds back those behind it), as on a single queue.
    pub jitter: Duration,
    pub seed: u64,
}

impl Impairment {
    pub fn none() -> Self {
        Self {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            seed: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    /// Datagrams and their UDP payload bytes offered by clients (towards the target) and by
    /// the target (towards clients), before loss: what the senders put on the wire.
    datagrams_up: AtomicU64,
    bytes_up: AtomicU64,
    datagrams_down: AtomicU64,
    bytes_down: AtomicU64,
}

impl Counters {
    fn offered(&self, up: bool, bytes: usize) {
        let (d, b) = if up {
            (&self.datagrams_up, &self.bytes_up)
        } else {
            (&self.datagrams_down, &self.bytes_down)
        };
        d.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Datagrams and UDP payload bytes one direction of a path was offered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offered {
    pub datagrams: u64,
    pub bytes: u64,
}

/// One direction's rules: loss and delay with its own random stream.
struct Shaper {
    impairment: Impairment,
    rng: StdRng,
    cut: Arc<AtomicBool>,
    counters: Arc<Counters>,
    /// Delivery time of the previous datagram: a datagram never overtakes it.
    last: Instant,
}

impl Shaper {
    fn new(
        impairment: Impairment,
        stream: u64,
        cut: Arc<AtomicBool>,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            impairment,
            rng: StdRng::seed_from_u64(
                impairment.seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            cut,
            counters,
            last: Instant::now(),
        }
    }

    /// When to deliver a datagram that arrived now, or `None` to drop it.
    fn schedule(&mut self) -> Option<Instant> {
        let i = self.impairment;
        if self.cut.load(Ordering::Relaxed) || (i.loss > 0.0 && self.rng.gen_bool(i.loss.min(1.0)))
        {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let extra = if i.jitter.is_zero() {
            Duration::ZERO
        } else {
            i.jitter.mul_f64(self.rng.gen::<f64>())
        };
        let at = (Instant::now() + i.delay + extra).max(self.last);
        self.last = at;
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        Some(at)
    }
}

/// Sends what it is given at the given times, in order.
fn delay_line(
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
) -> mpsc::UnboundedSender<(Instant, Vec<u8>)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((at, datagram)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            let _ = match to {
                Some(addr) => socket.send_to(&datagram, addr).await,
                None => socket.send(&datagram).await,
            };
        }
    });
    tx
}

/// A running impaired path to `target`; clients send to [`ImpairedPath::addr`]. Stops when
/// dropped.
pub struct ImpairedPath {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl ImpairedPath {
    /// Listens on the loopback address of `target`'s family.
    pub async fn start(target: SocketAddr, impairment: Impairment) -> std::io::Result<Self> {
        let bind: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (Ipv6Addr::LOCALHOST, 0).into()
        };
        let front = Arc::new(UdpSocket::bind(bind).await?);
        let addr = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (cut2, counters2) = (cut.clone(), counters.clone());
        let task = tokio::spawn(async move {
            // Per client: the socket towards the target and the delay line towards it.
            let mut upstreams: HashMap<SocketAddr, mpsc::UnboundedSender<(Instant, Vec<u8>)>> =
                HashMap::new();
            let mut up_shaper = Shaper::new(impairment, 0, cut2.clone(), counters2.clone());
            let mut backs = tokio::task::JoinSet::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, client)) = front.recv_from(&mut buf).await else {
                    return;
                };
                let up = match upstreams.get(&client) {
                    Some(up) => up.clone(),
                    None => {
                        let Ok(socket) = UdpSocket::bind(bind).await else {
                            continue;
                        };
                        if socket.connect(target).await.is_err() {
                            continue;
                        }
                        let socket = Arc::new(socket);
                        let up = delay_line(socket.clone(), None);
                        let back = delay_line(front.clone(), Some(client));
                        let stream = upstreams.len() as u64 + 1;
                        let mut shaper =
                            Shaper::new(impairment, stream, cut2.clone(), counters2.clone());
                        let counters = counters2.clone();
                        backs.spawn(async move {
                            let mut buf = vec![0u8; 65_536];
                            while let Ok(n) = socket.recv(&mut buf).await {
                                counters.offered(false, n);
                                if let Some(at) = shaper.schedule() {
                                    let _ = back.send((at, buf[..n].to_vec()));
                                }
                            }
                        });
                        upstreams.insert(client, up.clone());
                        up
                    }
                };
                counters2.offered(true, n);
                if let Some(at) = up_shaper.schedule() {
                    let _ = up.send((at, buf[..n].to_vec()));
                }
            }
        });
        Ok(Self {
            addr,
            cut,
            counters,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops everything in both directions from now on (`true`), as when a host vanishes
    /// from the network, or forwards again (`false`).
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }

    /// Datagrams passed on, both directions.
    pub fn forwarded(&self) -> u64 {
        self.counters.forwarded.load(Ordering::Relaxed)
    }

    /// Datagrams dropped (loss or cut), both directions.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// What clients sent towards the target (lost datagrams included).
    pub fn offered_up(&self) -> Offered {
        Offered {
            datagrams: self.counters.datagrams_up.load(Ordering::Relaxed),
            bytes: self.counters.bytes_up.load(Ordering::Relaxed),
        }
    }

    /// What the target sent back towards clients (lost datagrams included).
    pub fn offered_down(&self) -> Offered {
        Offered {
            datagrams: self.counters.datagrams_down.load(Ordering::Relaxed),
            bytes: self.counters.bytes_down.load(Ordering::Relaxed),
        }
    }
}

impl Drop for ImpairedPath {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_seeded_and_near_its_rate_and_delay_keeps_order() {
        let counters = Arc::new(Counters::default());
        let run = |seed| {
            let imp = Impairment {
                loss: 0.1,
                delay: Duration::from_millis(20),
                jitter: Duration::from_millis(10),
                seed,
            };
            let mut s = Shaper::new(imp, 1, Arc::default(), counters.clone());
            (0..10_000).map(|_| s.schedule()).collect::<Vec<_>>()
        };
        let a = run(7);
        let dropped = a.iter().filter(|d| d.is_none()).count();
        assert!(
            (800..1200).contains(&dropped),
            "{dropped} of 10000 dropped at 10 %"
        );
        let kept: Vec<Instant> = a.iter().flatten().copied().collect();
        assert!(kept.windows(2).all(|w| w[0] <= w[1]), "order kept");
        let pattern = |v: &[Option<Instant>]| v.iter().map(Option::is_some).collect::<Vec<_>>();
        assert_eq!(pattern(&a), pattern(&run(7)), "same seed, same losses");
        assert_ne!(pattern(&a), pattern(&run(8)));
    }
}
