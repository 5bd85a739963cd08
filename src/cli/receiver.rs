//! A small webhook receiver on loopback, built in so that `fhir-outbox demo` has somewhere real to
//! deliver to, and so that what a receiver should do is shown, not described: verify both signatures
//! with the subscription's secret, refuse old timestamps, and deduplicate on `webhook-id`.
//!
//! It is a plain HTTP/1.1 server on `127.0.0.1` (one request per connection, answered with
//! `Connection: close`), on tokio alone: the demo needs nothing a framework would add, and the code
//! stays readable as an example. Each endpoint is a path with its own secret; an endpoint can be told
//! to fail its first requests for every `webhook-id` with 503, so that retries can be seen.

use fhir_outbox::delivery::signature;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Largest request head we read (a notification's headers are well under 4 KiB).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest body we accept: the store's default resource size limit (4 MiB) with room to spare.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Standard Webhooks' recommended tolerance: older (or future) timestamps are refused as replays.
const TIMESTAMP_TOLERANCE_SECONDS: i64 = 300;
/// Time allowed to read a request, so that a stuck client cannot hold a task forever.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Events kept for [`Receiver::events_since`].
const EVENTS_KEPT: usize = 10_000;

/// Why the receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    /// Binding the loopback port failed.
    #[error("cannot listen on 127.0.0.1: {0}")]
    Bind(#[from] std::io::Error),
}

/// One path the receiver answers on.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The path, e.g. `/heart-rate`.
    pub path: String,
    /// The subscription's secret, to verify its signatures.
    pub secret: String,
    /// How many requests of each `webhook-id` are answered 503 before one is accepted (0: none).
    pub fail_first: u32,
}

/// What the receiver made of one request.
#[derive(Debug, Clone)]
pub struct Event {
    /// Position in the receiver's event log (from 1).
    pub seq: u64,
    /// When it arrived.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The request path.
    pub path: String,
    /// `create`, `update` or `delete` (`X-Medplum-Interaction`).
    pub interaction: String,
    /// `Type/id` of the resource (from the body, or `X-Medplum-Deleted-Resource` for a delete).
    pub resource: String,
    /// The status answered.
    pub status: u16,
    /// Why it was answered this way, in a few words.
    pub note: String,
}

/// Counters for one endpoint (or, summed, for the receiver).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests received.
    pub requests: u64,
    /// Requests whose `X-Signature` and `webhook-signature` both verified (timestamp recent).
    pub verified: u64,
    /// Requests refused with 401: a signature missing or wrong, a stale timestamp, or an unknown path.
    pub unverified: u64,
    /// Requests answered 503 on purpose (`fail_first`).
    pub planned_failures: u64,
    /// Requests accepted (answered 200).
    pub accepted: u64,
    /// Accepted requests whose `webhook-id` had already been accepted (at-least-once delivery made
    /// visible; expected to be 0 when nothing crashes).
    pub duplicates: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.verified += other.verified;
        self.unverified += other.unverified;
        self.planned_failures += other.planned_failures;
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
    }
}

#[derive(Default)]
struct State {
    by_path: BTreeMap<String, Counts>,
    /// Per `webhook-id`: requests seen and whether one was accepted.
    ids: HashMap<String, (u32, bool)>,
    events: VecDeque<Event>,
    next_seq: u64,
}

/// A running receiver. Stops when [`Receiver::stop`] is called or it is dropped.
pub struct Receiver {
    address: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

impl Receiver {
    /// Listens on `127.0.0.1` on a free port and answers on `endpoints`.
    pub async fn start(endpoints: Vec<Endpoint>) -> Result<Receiver, ReceiverError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let endpoints: Arc<HashMap<String, Endpoint>> = Arc::new(
            endpoints
                .into_iter()
                .map(|endpoint| (endpoint.path.clone(), endpoint))
                .collect(),
        );
        let state = Arc::new(Mutex::new(State {
            by_path: endpoints
                .keys()
                .map(|path| (path.clone(), Counts::default()))
                .collect(),
            ..State::default()
        }));
        let stop = CancellationToken::new();
        let (accept_state, accept_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(error) => {
                            tracing::warn!(%error, "demo receiver: accept failed");
                            continue;
                        }
                    },
                    _ = accept_stop.cancelled() => return,
                };
                let (endpoints, state) = (endpoints.clone(), accept_state.clone());
                tokio::spawn(async move {
                    if let Err(error) = serve(stream, &endpoints, &state).await {
                        tracing::debug!(%error, "demo receiver: connection failed");
                    }
                });
            }
        });
        Ok(Receiver {
            address,
            state,
            stop,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The counters of every endpoint, by path (unknown paths are counted under their own path).
    pub fn counts_by_path(&self) -> BTreeMap<String, Counts> {
        self.state.lock().expect("receiver state").by_path.clone()
    }

    /// The counters of all endpoints together.
    pub fn counts(&self) -> Counts {
        let mut total = Counts::default();
        for counts in self.counts_by_path().values() {
            total.add(counts);
        }
        total
    }

    /// Events after `seq` (0 for all that are kept), oldest first.
    pub fn events_since(&self, seq: u64) -> Vec<Event> {
        let state = self.state.lock().expect("receiver state");
        state
            .events
            .iter()
            .filter(|event| event.seq > seq)
            .cloned()
            .collect()
    }

    /// The last `n` events, oldest first.
    pub fn last_events(&self, n: usize) -> Vec<Event> {
        let state = self.state.lock().expect("receiver state");
        let skip = state.events.len().saturating_sub(n);
        state.events.iter().skip(skip).cloned().collect()
    }

    /// Stops accepting connections (requests being answered finish on their own).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A parsed request.
struct Request {
    path: String,
    /// Header names lower-cased.
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// What a request came to: the answer, and why.
struct Answer {
    status: u16,
    note: String,
}

async fn serve(
    mut stream: TcpStream,
    endpoints: &HashMap<String, Endpoint>,
    state: &Mutex<State>,
) -> std::io::Result<()> {
    let request = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(Some(request))) => request,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(error)) => {
            let _ = respond(&mut stream, 400, &error.to_string()).await;
            return Ok(());
        }
        Err(_) => return Ok(()),
    };
    let answer = answer(&request, endpoints, state, chrono::Utc::now());
    respond(&mut stream, answer.status, &answer.note).await
}

/// Decides the answer and records the request.
fn answer(
    request: &Request,
    endpoints: &HashMap<String, Endpoint>,
    state: &Mutex<State>,
    now: chrono::DateTime<chrono::Utc>,
) -> Answer {
    let webhook_id = request.header("webhook-id").unwrap_or_default().to_owned();
    let verification = match endpoints.get(&request.path) {
        None => Err("unknown path".to_owned()),
        Some(endpoint) => verify(&endpoint.secret, request, now.timestamp()),
    };
    let mut state = state.lock().expect("receiver state");
    let State {
        by_path,
        ids,
        events,
        next_seq,
    } = &mut *state;
    let counts = by_path.entry(request.path.clone()).or_default();
    counts.requests += 1;
    let answer = match verification {
        Err(problem) => {
            counts.unverified += 1;
            Answer {
                status: 401,
                note: format!("refused: {problem}"),
            }
        }
        Ok(()) => {
            counts.verified += 1;
            let fail_first = endpoints.get(&request.path).map_or(0, |e| e.fail_first);
            let (seen, accepted) = ids.entry(webhook_id).or_insert((0, false));
            *seen += 1;
            if *seen <= fail_first {
                counts.planned_failures += 1;
                Answer {
                    status: 503,
                    // Per webhook-id: every notification is failed this many times, its retries then succeed.
                    note: format!("planned failure {seen}/{fail_first}"),
                }
            } else if *accepted {
                // At-least-once delivery: a receiver acknowledges a duplicate but does not act on it.
                counts.accepted += 1;
                counts.duplicates += 1;
                Answer {
                    status: 200,
                    note: "verified; duplicate webhook-id, ignored".to_owned(),
                }
            } else {
                *accepted = true;
                counts.accepted += 1;
                Answer {
                    status: 200,
                    note: "verified".to_owned(),
                }
            }
        }
    };
    *next_seq += 1;
    events.push_back(Event {
        seq: *next_seq,
        at: now,
        path: request.path.clone(),
        interaction: request
            .header("x-medplum-interaction")
            .unwrap_or("?")
            .to_owned(),
        resource: resource_of(request),
        status: answer.status,
        note: answer.note.clone(),
    });
    if events.len() > EVENTS_KEPT {
        events.pop_front();
    }
    answer
}

/// Checks both signatures and the timestamp, as a receiver should (README, "Verifying notifications").
fn verify(secret: &str, request: &Request, now: i64) -> Result<(), String> {
    let x_signature = request
        .header("x-signature")
        .ok_or("no X-Signature header")?;
    if !constant_time_eq(
        x_signature.as_bytes(),
        signature::x_signature(secret, &request.body).as_bytes(),
    ) {
        return Err("X-Signature does not match the body".to_owned());
    }
    let id = request.header("webhook-id").ok_or("no webhook-id header")?;
    let timestamp: i64 = request
        .header("webhook-timestamp")
        .and_then(|t| t.parse().ok())
        .ok_or("no valid webhook-timestamp header")?;
    if (now - timestamp).abs() > TIMESTAMP_TOLERANCE_SECONDS {
        return Err(format!("webhook-timestamp {timestamp} is too far from now"));
    }
    let expected = signature::webhook_signature(secret, id, timestamp, &request.body);
    let signatures = request
        .header("webhook-signature")
        .ok_or("no webhook-signature header")?;
    // The header may carry several space-separated signatures (key rotation): one match suffices.
    if signatures
        .split(' ')
        .any(|candidate| constant_time_eq(candidate.as_bytes(), expected.as_bytes()))
    {
        Ok(())
    } else {
        Err("webhook-signature does not match".to_owned())
    }
}

/// Compares without stopping at the first difference, so timing does not reveal a valid prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Type/id` of the notified resource.
fn resource_of(request: &Request) -> String {
    if let Some(deleted) = request.header("x-medplum-deleted-resource") {
        return deleted.to_owned();
    }
    serde_json::from_slice::<serde_json::Value>(&request.body)
        .ok()
        .and_then(|body| {
            Some(format!(
                "{}/{}",
                body.get("resourceType")?.as_str()?,
                body.get("id")?.as_str()?
            ))
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// Reads one request; `None` when the client closed the connection without sending one.
async fn read_request(stream: &mut TcpStream) -> Result<Option<Request>, std::io::Error> {
    let invalid = |message: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, message);
    let mut buffer = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(invalid("request head too large"));
        }
    };
    let head = std::str::from_utf8(&buffer[..head_end]).map_err(|_| invalid("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next());
    let Some(target) = target.filter(|_| method == "POST") else {
        return Err(invalid("only POST requests are expected"));
    };
    let path = target.split('?').next().unwrap_or_default().to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    if headers.contains_key("transfer-encoding") {
        // The worker always sends a Content-Length; nothing else needs to be understood here.
        return Err(invalid("chunked bodies are not supported"));
    }
    let length: usize = match headers.get("content-length") {
        None => 0,
        Some(length) => length
            .parse()
            .map_err(|_| invalid("invalid Content-Length"))?,
    };
    if length > MAX_BODY_BYTES {
        return Err(invalid("body too large"));
    }
    let mut body = buffer[head_end + 4..].to_vec();
    body.truncate(length);
    while body.len() < length {
        let mut chunk = vec![0u8; (length - body.len()).min(64 * 1024)];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(invalid("connection closed mid-body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Some(Request {
        path,
        headers,
        body,
    }))
}

async fn respond(stream: &mut TcpStream, status: u16, note: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    // The note becomes the attempt's `response_body` in fhir_outbox.delivery_attempt: visible in SQL.
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{note}",
        note.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(fail_first: u32) -> HashMap<String, Endpoint> {
        HashMap::from([(
            "/hook".to_owned(),
            Endpoint {
                path: "/hook".to_owned(),
                secret: "s3cret".to_owned(),
                fail_first,
            },
        )])
    }

    fn signed(id: &str, timestamp: i64, body: &[u8], secret: &str) -> Request {
        let headers = HashMap::from([
            ("webhook-id".to_owned(), id.to_owned()),
            ("webhook-timestamp".to_owned(), timestamp.to_string()),
            (
                "webhook-signature".to_owned(),
                signature::webhook_signature(secret, id, timestamp, body),
            ),
            (
                "x-signature".to_owned(),
                signature::x_signature(secret, body),
            ),
        ]);
        Request {
            path: "/hook".to_owned(),
            headers,
            body: body.to_vec(),
        }
    }

    #[test]
    fn verifies_both_signatures_and_the_timestamp() {
        let now = 1_700_000_000;
        let body = br#"{"resourceType":"Patient","id":"p1"}"#;
        assert_eq!(
            verify("s3cret", &signed("a", now, body, "s3cret"), now),
            Ok(())
        );
        assert!(verify("s3cret", &signed("a", now, body, "other"), now).is_err());
        assert!(verify("s3cret", &signed("a", now - 301, body, "s3cret"), now).is_err());
        let mut tampered = signed("a", now, body, "s3cret");
        tampered.body = br#"{"resourceType":"Patient","id":"p2"}"#.to_vec();
        assert!(verify("s3cret", &tampered, now).is_err());
        let mut rotated = signed("a", now, body, "s3cret");
        let good = rotated.headers["webhook-signature"].clone();
        rotated
            .headers
            .insert("webhook-signature".to_owned(), format!("v1,AAAA {good}"));
        assert_eq!(verify("s3cret", &rotated, now), Ok(()));
    }

    #[test]
    fn fails_the_first_requests_of_each_id_then_counts_duplicates() {
        let endpoints = endpoints(2);
        let state = Mutex::new(State::default());
        let now = chrono::Utc::now();
        let request = signed("id-1", now.timestamp(), b"{}", "s3cret");
        let statuses: Vec<u16> = (0..4)
            .map(|_| answer(&request, &endpoints, &state, now).status)
            .collect();
        assert_eq!(statuses, [503, 503, 200, 200]);
        let counts = state.lock().unwrap().by_path["/hook"];
        assert_eq!(
            counts,
            Counts {
                requests: 4,
                verified: 4,
                unverified: 0,
                planned_failures: 2,
                accepted: 2,
                duplicates: 1,
            }
        );
        let forged = signed("id-2", now.timestamp(), b"{}", "wrong");
        assert_eq!(answer(&forged, &endpoints, &state, now).status, 401);
        assert_eq!(state.lock().unwrap().by_path["/hook"].unverified, 1);
    }
}
