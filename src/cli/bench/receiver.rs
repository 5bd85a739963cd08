//! The benchmark's loopback webhook receiver: a minimal HTTP/1.1 server with keep-alive that answers
//! every request `200` with an empty body as soon as the whole body has arrived. It counts requests,
//! notes the first and last arrival, and, when asked, keeps each body with its arrival time (for the
//! latency figure). It runs in the bench process, on the same tokio runtime.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

#[derive(Default)]
struct State {
    count: AtomicU64,
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
    /// Binds a free loopback port and starts serving.
    pub async fn start() -> std::io::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, state).await;
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

    /// Forgets counts and recorded bodies.
    pub fn reset(&self) {
        self.state.count.store(0, Ordering::Release);
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

async fn serve(mut stream: TcpStream, state: Arc<State>) -> std::io::Result<()> {
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
        state.count.fetch_add(1, Ordering::AcqRel);
        stream.write_all(RESPONSE).await?;
    }
}
