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

/// How the lost datagrams of one direction are spread over time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum LossPattern {
    /// Each datagram is lost on its own, with probability `loss`.
    #[default]
    Random,
    /// Losses come in runs (a two-state Gilbert model): after a delivered datagram a run of
    /// losses starts with probability `p`, after a lost one it ends with probability
    /// `1 / mean_len`, and `p` is chosen so that the long-run share lost is still `loss`.
    /// Run lengths are geometric with mean `mean_len` datagrams. Real access links (Wi-Fi,
    /// cellular handovers, a full queue) lose in runs, and a run defeats Opus in-band FEC,
    /// which can only rebuild a frame whose next packet arrives.
    Bursts { mean_len: f64 },
}

/// What happens to each datagram, in each direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Share of datagrams dropped, 0.0..=1.0.
    pub loss: f64,
    /// Whether those losses are independent or come in runs.
    pub pattern: LossPattern,
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
            pattern: LossPattern::Random,
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
    /// In a run of losses ([`LossPattern::Bursts`]).
    in_burst: bool,
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
            in_burst: false,
        }
    }

    /// Whether the next datagram is lost (one draw from this direction's random stream).
    fn lose(&mut self) -> bool {
        let loss = self.impairment.loss;
        if loss.is_nan() || loss <= 0.0 {
            return false;
        }
        match self.impairment.pattern {
            LossPattern::Random => self.rng.gen_bool(loss.min(1.0)),
            LossPattern::Bursts { .. } if loss >= 1.0 => true,
            LossPattern::Bursts { mean_len } => {
                let end = 1.0 / mean_len.max(1.0);
                // Stationary share lost of the two-state chain: start / (start + end).
                let start = (loss * end / (1.0 - loss)).min(1.0);
                self.in_burst = if self.in_burst {
                    !self.rng.gen_bool(end)
                } else {
                    self.rng.gen_bool(start)
                };
                self.in_burst
            }
        }
    }

    /// When to deliver a datagram that arrived now, or `None` to drop it.
    fn schedule(&mut self) -> Option<Instant> {
        let i = self.impairment;
        if self.cut.load(Ordering::Relaxed) || self.lose() {
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
                pattern: LossPattern::Random,
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

    /// Lengths of the runs of `true` in `lost`.
    fn runs(lost: &[bool]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut n = 0;
        for &l in lost {
            if l {
                n += 1;
            } else if n > 0 {
                out.push(n);
                n = 0;
            }
        }
        if n > 0 {
            out.push(n);
        }
        out
    }

    #[test]
    fn bursts_are_seeded_keep_the_rate_and_come_in_runs() {
        let counters = Arc::new(Counters::default());
        let run = |seed, pattern| {
            let imp = Impairment {
                loss: 0.05,
                pattern,
                delay: Duration::ZERO,
                jitter: Duration::ZERO,
                seed,
            };
            let mut s = Shaper::new(imp, 1, Arc::default(), counters.clone());
            (0..40_000)
                .map(|_| s.schedule().is_none())
                .collect::<Vec<_>>()
        };
        let bursts = LossPattern::Bursts { mean_len: 4.0 };
        let a = run(11, bursts);
        let lost = a.iter().filter(|l| **l).count();
        assert!(
            (1400..2600).contains(&lost),
            "{lost} of 40000 lost at 5 % in bursts"
        );
        let mean_run = |v: &[bool]| {
            let r = runs(v);
            r.iter().sum::<usize>() as f64 / r.len().max(1) as f64
        };
        let bursty = mean_run(&a);
        assert!(
            (3.0..5.0).contains(&bursty),
            "mean run {bursty}, wanted about 4"
        );
        let random = mean_run(&run(11, LossPattern::Random));
        assert!(random < 1.3, "independent losses rarely pair up: {random}");
        assert_eq!(a, run(11, bursts), "same seed, same losses");
        assert_ne!(a, run(12, bursts));
        // Everything lost stays everything lost.
        let all = Impairment {
            loss: 1.0,
            ..Impairment::none()
        };
        let mut s = Shaper::new(
            Impairment {
                pattern: bursts,
                ..all
            },
            1,
            Arc::default(),
            counters,
        );
        assert!((0..100).all(|_| s.schedule().is_none()));
    }
}
