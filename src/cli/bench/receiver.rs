//! The benchmark's loopback webhook receiver: a minimal HTTP/1.1 server with keep-alive that, by
//! default, answers every request `200` with an empty body as soon as the whole body has arrived;
//! other [`Behaviour`]s answer after a delay, answer `500`, or never answer (the endpoints of the
//! isolation scenarios). It counts requests, notes the first and last arrival, and, when asked, keeps
//! each body with its arrival time (for the latency figures). It runs in the bench process, on the
//! same tokio runtime: each connection is its own task, so a delayed or hanging request holds only
//! its own connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
const SERVER_ERROR: &[u8] = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n";

/// How a receiver answers each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// `200` as soon as the whole request has arrived.
    Immediate,
    /// `200` after a delay from `min_ms` to `max_ms` (inclusive), spread evenly over the requests:
    /// the delay of the receiver's `n`th request is a fixed function of `n`, so runs are
    /// comparable. Other connections are served meanwhile (a tokio sleep in this connection's task).
    Delay {
        /// The shortest delay, milliseconds.
        min_ms: u64,
        /// The longest delay, milliseconds.
        max_ms: u64,
    },
    /// `500` at once.
    ServerError,
    /// Accepts the connection and reads the request, never answers, and keeps the connection open
    /// until the client gives up (its request timeout) and closes it.
    Hang,
}

impl Behaviour {
    /// The delay before answering the `n`th request (counted from 0) of a delaying receiver.
    fn delay(self, n: u64) -> Duration {
        match self {
            Behaviour::Delay { min_ms, max_ms } => {
                let span = max_ms.saturating_sub(min_ms) + 1;
                // A prime multiplier (coprime with any span below 7,919) visits every delay of the
                // range once per `span` requests, in a scrambled order: consecutive requests get
                // unrelated delays, and every run the same ones.
                Duration::from_millis(min_ms + n.wrapping_mul(7_919) % span)
            }
            _ => Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct State {
    count: AtomicU64,
    /// Requests arrived and not yet answered (kept for delaying and hanging receivers only, so that
    /// the immediate path does no more work than before).
    in_flight: AtomicU64,
    /// The most of them at once since the last reset.
    max_in_flight: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    recording: AtomicBool,
    recorded: Mutex<Vec<(Instant, Vec<u8>)>>,
}

/// A running receiver; stopped on drop.
pub struct Receiver {
    /// `http://127.0.0.1:<port>/hook`.
    pub url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Binds a free loopback port and starts serving, answering `200` at once.
    pub async fn start() -> std::io::Result<Receiver> {
        Receiver::start_with(Behaviour::Immediate).await
    }

    /// Binds a free loopback port (a distinct endpoint for the worker: its origin includes the
    /// port) and starts serving with `behaviour`.
    pub async fn start_with(behaviour: Behaviour) -> std::io::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, state, behaviour).await;
                });
            }
        });
        Ok(Receiver { url, state, task })
    }

    /// Requests answered since the last reset.
    pub fn count(&self) -> u64 {
        self.state.count.load(Ordering::Acquire)
    }

    /// When the first request since the last reset arrived.
    pub fn first_arrival(&self) -> Option<Instant> {
        *self.state.first.lock().expect("receiver lock")
    }

    /// When the latest request since the last reset arrived.
    pub fn last_arrival(&self) -> Option<Instant> {
        *self.state.last.lock().expect("receiver lock")
    }

    /// The most requests this receiver held unanswered at once since the last reset (delaying and
    /// hanging receivers; 0 for the others).
    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::Acquire)
    }

    /// Forgets counts and recorded bodies.
    pub fn reset(&self) {
        self.state.count.store(0, Ordering::Release);
        let in_flight = self.state.in_flight.load(Ordering::Acquire);
        self.state.max_in_flight.store(in_flight, Ordering::Release);
        *self.state.first.lock().expect("receiver lock") = None;
        *self.state.last.lock().expect("receiver lock") = None;
        self.state.recorded.lock().expect("receiver lock").clear();
    }

    /// Keep (arrival time, body) of every request from now on, or stop keeping them.
    pub fn set_recording(&self, on: bool) {
        self.state.recording.store(on, Ordering::Release);
    }

    /// The recorded requests, taken out.
    pub fn take_recorded(&self) -> Vec<(Instant, Vec<u8>)> {
        std::mem::take(&mut *self.state.recorded.lock().expect("receiver lock"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request held unanswered: counted in `in_flight` until dropped (also when the connection
/// fails while it waits).
struct Held<'a>(&'a State);

impl<'a> Held<'a> {
    fn new(state: &'a State) -> Held<'a> {
        let now = state.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        state.max_in_flight.fetch_max(now, Ordering::AcqRel);
        Held(state)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> Option<usize> {
    let head = std::str::from_utf8(head).ok()?;
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                return value.trim().parse().ok();
            }
            if name.trim().eq_ignore_ascii_case("transfer-encoding") {
                // Not needed: the worker always sends a sized body.
                return None;
            }
        }
    }
    Some(0)
}

async fn serve(
    mut stream: TcpStream,
    state: Arc<State>,
    behaviour: Behaviour,
) -> std::io::Result<()> {
    let mut buffer: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 16384];
    loop {
        // Read until a whole request (head and body) is buffered; keep what follows (pipelining).
        let (head_end, length) = loop {
            if let Some(end) = find(&buffer, b"\r\n\r\n") {
                let Some(length) = content_length(&buffer[..end]) else {
                    return Ok(());
                };
                if buffer.len() >= end + 4 + length {
                    break (end, length);
                }
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..n]);
        };
        let arrived = Instant::now();
        let body_start = head_end + 4;
        if state.recording.load(Ordering::Acquire) {
            let body = buffer[body_start..body_start + length].to_vec();
            state
                .recorded
                .lock()
                .expect("receiver lock")
                .push((arrived, body));
        }
        buffer.drain(..body_start + length);
        {
            let mut first = state.first.lock().expect("receiver lock");
            if first.is_none() {
                *first = Some(arrived);
            }
        }
        *state.last.lock().expect("receiver lock") = Some(arrived);
        let n = state.count.fetch_add(1, Ordering::AcqRel);
        match behaviour {
            Behaviour::Immediate => stream.write_all(RESPONSE).await?,
            Behaviour::Delay { .. } => {
                let _held = Held::new(&state);
                tokio::time::sleep(behaviour.delay(n)).await;
                stream.write_all(RESPONSE).await?;
            }
            Behaviour::ServerError => stream.write_all(SERVER_ERROR).await?,
            Behaviour::Hang => {
                let _held = Held::new(&state);
                // Never answer; read (and drop) whatever comes until the client closes, so that the
                // connection stays open as long as the client waits and is freed when it gives up.
                while stream.read(&mut chunk).await? > 0 {}
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &[u8] = b"POST /hook HTTP/1.1\r\nhost: bench\r\ncontent-length: 2\r\n\r\n{}";

    /// Sends one request on a new connection; returns the first bytes of the answer (or the timeout).
    async fn send(
        receiver: &Receiver,
        wait: Duration,
    ) -> Result<Vec<u8>, tokio::time::error::Elapsed> {
        let address = receiver
            .url
            .trim_start_matches("http://")
            .trim_end_matches("/hook")
            .to_owned();
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(REQUEST).await.expect("write");
        let mut answer = vec![0u8; 64];
        tokio::time::timeout(wait, async {
            let n = stream.read(&mut answer).await.expect("read");
            answer.truncate(n);
            answer
        })
        .await
    }

    #[test]
    fn delays_cover_the_range_once_per_span_in_a_scrambled_order() {
        let behaviour = Behaviour::Delay {
            min_ms: 50,
            max_ms: 200,
        };
        let delays: Vec<u128> = (0..151).map(|n| behaviour.delay(n).as_millis()).collect();
        let mut sorted = delays.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (50..=200).collect::<Vec<u128>>());
        assert!(delays.windows(2).all(|pair| pair[0].abs_diff(pair[1]) > 1));
        assert_eq!(Behaviour::Immediate.delay(7), Duration::ZERO);
    }

    #[tokio::test]
    async fn answers_as_its_behaviour_says() {
        let immediate = Receiver::start().await.expect("receiver");
        let answer = send(&immediate, Duration::from_secs(5))
            .await
            .expect("answer");
        assert!(answer.starts_with(b"HTTP/1.1 200"));

        let failing = Receiver::start_with(Behaviour::ServerError)
            .await
            .expect("receiver");
        let answer = send(&failing, Duration::from_secs(5))
            .await
            .expect("answer");
        assert!(answer.starts_with(b"HTTP/1.1 500"));

        let slow = Receiver::start_with(Behaviour::Delay {
            min_ms: 150,
            max_ms: 150,
        })
        .await
        .expect("receiver");
        let clock = Instant::now();
        let answer = send(&slow, Duration::from_secs(5)).await.expect("answer");
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        assert!(clock.elapsed() >= Duration::from_millis(150));
        assert_eq!(slow.max_in_flight(), 1);

        let hanging = Receiver::start_with(Behaviour::Hang)
            .await
            .expect("receiver");
        assert!(send(&hanging, Duration::from_millis(300)).await.is_err());
        assert_eq!(hanging.count(), 1);
        assert_eq!(hanging.max_in_flight(), 1);
    }
}
