//! A real HTTP/1.1 webhook receiver on loopback for the tests. It records every request and answers
//! from a script, which can also drop the connection or hold the request open (what a real receiver
//! in trouble does), things a framework would not let us do.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// When the whole request had arrived.
    pub at: chrono::DateTime<chrono::Utc>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// What to do with the next request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer with this status (and `Retry-After` when given).
    Status(u16, Option<&'static str>),
    /// Close the connection without answering.
    Drop,
    /// Hold the request open this long, then answer 200.
    Stall(Duration),
    /// Hold the request open until the test calls `notify_one` on this, then answer 200 (a
    /// receiver the test releases when it has set up what it measures).
    Hold(Arc<tokio::sync::Notify>),
    /// Answer 200 with a body of this many bytes.
    Huge(usize),
    /// Answer 302 with this `Location`.
    Redirect(String),
}

pub struct Receiver {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts a receiver that answers with `script` in order, then 200 to everything.
    pub async fn start(script: Vec<Reply>) -> Receiver {
        Self::start_with_latency(script, Duration::ZERO).await
    }

    /// Like [`Receiver::start`], but each answer after the script waits a random time up to
    /// `latency` (a receiver that answers after 0–100 ms keeps requests in flight when a worker dies).
    pub async fn start_with_latency(script: Vec<Reply>, latency: Duration) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let (r, s) = (received.clone(), script);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, s) = (r.clone(), s.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, r, s, latency).await;
                });
            }
        });
        Receiver {
            url,
            received,
            task,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
    latency: Duration,
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    let header_end = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
        // A TLS ClientHello to this plain-HTTP server: answer as a real one does, in plain text.
        if buffer[0] == 0x16 {
            stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                .await?;
            return stream.shutdown().await;
        }
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap_or_default()
        .to_owned();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[header_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    received.lock().unwrap().push(Received {
        path,
        headers,
        body,
        at: chrono::Utc::now(),
    });
    let reply = script.lock().unwrap().pop_front().unwrap_or_else(|| {
        if latency.is_zero() {
            Reply::Status(200, None)
        } else {
            Reply::Stall(latency.mul_f64(rand::random::<f64>()))
        }
    });
    let (status, retry_after) = match reply {
        Reply::Drop => return Ok(()),
        Reply::Huge(size) => {
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
            stream.write_all(head.as_bytes()).await?;
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = size;
            while left > 0 {
                let n = left.min(chunk.len());
                // The worker stops reading after its prefix and closes: that ends this loop.
                if stream.write_all(&chunk[..n]).await.is_err() {
                    return Ok(());
                }
                left -= n;
            }
            return stream.shutdown().await;
        }
        Reply::Stall(duration) => {
            tokio::time::sleep(duration).await;
            (200, None)
        }
        Reply::Hold(release) => {
            release.notified().await;
            (200, None)
        }
        Reply::Status(status, retry_after) => (status, retry_after),
        Reply::Redirect(location) => {
            let response = format!(
                "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(response.as_bytes()).await?;
            return stream.shutdown().await;
        }
    };
    let retry_after = retry_after
        .map(|value| format!("Retry-After: {value}\r\n"))
        .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n{retry_after}\r\nok"
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
